//! Local time for people: default tags, `--until`, and times in the log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};

fn local(unix: i64) -> libc::tm {
    // SAFETY: localtime_r fills the struct we own from a valid time_t.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&(unix as libc::time_t), &mut tm);
        tm
    }
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Today as the original's tags read: `nov23`.
pub fn today_tag() -> String {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let tm = local(now_unix());
    format!("{}{}", MONTHS[tm.tm_mon.clamp(0, 11) as usize], tm.tm_mday)
}

/// `HH:MM` local time.
pub fn hh_mm(unix: u64) -> String {
    let tm = local(unix as i64);
    format!("{:02}:{:02}", tm.tm_hour, tm.tm_min)
}

/// `--until`: a local time `HH:MM` (the next one to come) or a duration `8h`, `90m`, `30s`.
pub fn parse_until(s: &str) -> Result<SystemTime> {
    let s = s.trim();
    if let Some((h, m)) = s.split_once(':') {
        let (Ok(h), Ok(m)) = (h.parse::<i64>(), m.parse::<i64>()) else {
            bail!("--until {s}: expected HH:MM, e.g. 07:30");
        };
        if !(0..24).contains(&h) || !(0..60).contains(&m) {
            bail!("--until {s}: expected HH:MM, e.g. 07:30");
        }
        let now = now_unix();
        let tm = local(now);
        let since_midnight =
            i64::from(tm.tm_hour) * 3600 + i64::from(tm.tm_min) * 60 + i64::from(tm.tm_sec);
        let mut wait = h * 3600 + m * 60 - since_midnight;
        if wait <= 0 {
            wait += 24 * 3600;
        }
        return Ok(SystemTime::now() + Duration::from_secs(wait as u64));
    }
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let Ok(n) = num.parse::<f64>() else {
        bail!("--until {s}: give a local time like 07:30 or a duration like 8h or 90m");
    };
    let secs = match unit {
        "h" => n * 3600.0,
        "m" => n * 60.0,
        "s" | "" => n,
        _ => bail!("--until {s}: give a local time like 07:30 or a duration like 8h or 90m"),
    };
    Ok(SystemTime::now() + Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_reads_durations_and_clock_times() {
        let in_90m = parse_until("90m")
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!((in_90m.as_secs_f64() - 5400.0).abs() < 5.0);
        let at = parse_until("07:30")
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(at.as_secs() <= 24 * 3600);
        assert!(parse_until("25:00").is_err() && parse_until("soon").is_err());
        assert!(today_tag().len() >= 4);
    }
}
