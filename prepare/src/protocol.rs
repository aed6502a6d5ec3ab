//! The evaluation protocol between the harness and a train process. The harness scores the
//! model, not the process: after training, the process serves its model and the harness feeds it
//! the validation rows, reads per-token losses back and computes val_bpb itself.
//!
//! Two pipes. The process writes *marks and replies* on file descriptor [`HARNESS_FD`]; it reads
//! *requests* on stdin. Frames are a tag byte and little-endian fields:
//!
//! | from | tag | fields | meaning |
//! |---|---|---|---|
//! | process | `S` | | the first timed training step begins (the warm-up is over) |
//! | process | `E` | u32 len, JSON [`TrainStats`] | training is over; serve the evaluation |
//! | harness | `L` | u32 rows, u32 seq, rows·seq u32 inputs, rows·seq u32 targets | score these |
//! | process | `L` | u32 n, n f32 | cross-entropy of each target, nats |
//! | harness | `G` | u32 seq, seq u32 inputs, u32 k, k u32 positions | logits at these positions |
//! | process | `G` | u32 n, n f32 | k logit vectors of the vocabulary's size |
//! | process | `X` | u32 len, UTF-8 | the model failed (the message says why) |
//! | harness | `D` | | done: exit |
//!
//! Nothing here trusts the other side: every count is bounded before anything is allocated.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// The descriptor a served process writes marks and replies to.
pub const HARNESS_FD: i32 = 3;

/// What only the process can measure, sent with its request for evaluation. The harness keeps
/// its own time and its own val_bpb; these figures are reported as the process gives them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainStats {
    pub num_steps: u64,
    pub total_tokens: u64,
    /// Training FLOPs per token (6·N plus attention), for MFU.
    pub flops_per_token: f64,
    pub num_params: u64,
    pub depth: u64,
    pub peak_vram_mb: f64,
    /// Rows the model takes per request without running out of memory.
    pub eval_batch_rows: u32,
    /// The process's own count of training time, for the record only.
    pub training_seconds: f64,
}

/// Peak dense bf16 FLOP/s of an H100 SXM, the original's MFU denominator.
pub const H100_BF16_PEAK_FLOPS: f64 = 989.5e12;

/// Model FLOP utilisation in percent (0 off CUDA, where the figure means nothing).
pub fn mfu_percent(device_is_cuda: bool, flops_per_token: f64, tokens: f64, seconds: f64) -> f64 {
    if !device_is_cuda || seconds <= 0.0 {
        return 0.0;
    }
    100.0 * flops_per_token * tokens / seconds / H100_BF16_PEAK_FLOPS
}

/// Tokens of the timed steps (the warm-up steps' excluded), for MFU.
pub fn timed_tokens(stats: &TrainStats) -> f64 {
    let timed = stats
        .num_steps
        .saturating_sub(crate::clock::WARMUP_STEPS + 1);
    stats.total_tokens as f64 * timed as f64 / stats.num_steps.max(1) as f64
}

/// Process → harness.
#[derive(Clone, Debug, PartialEq)]
pub enum Mark {
    Start,
    Evaluate(TrainStats),
    Losses(Vec<f32>),
    Logits(Vec<f32>),
    Failed(String),
}

/// Harness → process.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Losses {
        rows: u32,
        seq: u32,
        inputs: Vec<u32>,
        targets: Vec<u32>,
    },
    Logits {
        inputs: Vec<u32>,
        positions: Vec<u32>,
    },
    Done,
}

/// Largest payload either side accepts in one frame: 1 GiB.
pub const MAX_FRAME_BYTES: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the other side closed the pipe")]
    Closed,
    #[error("pipe: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn read_u32(r: &mut impl Read) -> Result<u32, ProtocolError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(eof_is_closed)?;
    Ok(u32::from_le_bytes(b))
}

fn eof_is_closed(e: std::io::Error) -> ProtocolError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ProtocolError::Closed
    } else {
        ProtocolError::Io(e)
    }
}

/// Reads `n` little-endian 4-byte words, refusing counts past [`MAX_FRAME_BYTES`].
fn read_words(r: &mut impl Read, n: u32) -> Result<Vec<[u8; 4]>, ProtocolError> {
    let n = n as usize;
    if n * 4 > MAX_FRAME_BYTES {
        return Err(ProtocolError::Malformed(format!("{n} words in one frame")));
    }
    let mut bytes = vec![0u8; n * 4];
    r.read_exact(&mut bytes).map_err(eof_is_closed)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| c.try_into().unwrap())
        .collect())
}

fn read_u32s(r: &mut impl Read, n: u32) -> Result<Vec<u32>, ProtocolError> {
    Ok(read_words(r, n)?
        .into_iter()
        .map(u32::from_le_bytes)
        .collect())
}

fn read_f32s(r: &mut impl Read, max: usize) -> Result<Vec<f32>, ProtocolError> {
    let n = read_u32(r)?;
    if n as usize > max {
        return Err(ProtocolError::Malformed(format!(
            "{n} values where at most {max} were asked for"
        )));
    }
    Ok(read_words(r, n)?
        .into_iter()
        .map(f32::from_le_bytes)
        .collect())
}

fn read_text(r: &mut impl Read) -> Result<String, ProtocolError> {
    let n = read_u32(r)? as usize;
    if n > 1 << 20 {
        return Err(ProtocolError::Malformed(format!("{n} bytes of text")));
    }
    let mut bytes = vec![0u8; n];
    r.read_exact(&mut bytes).map_err(eof_is_closed)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn put_u32s(out: &mut Vec<u8>, words: &[u32]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

fn put_f32s(out: &mut Vec<u8>, tag: u8, values: &[f32]) {
    out.push(tag);
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_text(out: &mut Vec<u8>, tag: u8, text: &str) {
    out.push(tag);
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

impl Mark {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Mark::Start => out.push(b'S'),
            Mark::Evaluate(stats) => {
                put_text(&mut out, b'E', &serde_json::to_string(stats).unwrap())
            }
            Mark::Losses(v) => put_f32s(&mut out, b'L', v),
            Mark::Logits(v) => put_f32s(&mut out, b'G', v),
            Mark::Failed(why) => put_text(&mut out, b'X', why),
        }
        out
    }

    pub fn read(r: &mut impl Read) -> Result<Mark, ProtocolError> {
        Self::read_at_most(r, || MAX_FRAME_BYTES / 4)
    }

    /// Reads a mark whose losses or logits hold at most `max()` values (what was asked for,
    /// looked up once the frame has begun).
    pub fn read_at_most(r: &mut impl Read, max: impl Fn() -> usize) -> Result<Mark, ProtocolError> {
        let mut tag = [0u8];
        r.read_exact(&mut tag).map_err(eof_is_closed)?;
        Ok(match tag[0] {
            b'S' => Mark::Start,
            b'E' => {
                let text = read_text(r)?;
                Mark::Evaluate(serde_json::from_str(&text).map_err(|e| {
                    ProtocolError::Malformed(format!("training figures `{text}`: {e}"))
                })?)
            }
            b'L' => Mark::Losses(read_f32s(r, max())?),
            b'G' => Mark::Logits(read_f32s(r, max())?),
            b'X' => Mark::Failed(read_text(r)?),
            other => {
                return Err(ProtocolError::Malformed(format!(
                    "unknown mark {other:#04x}"
                )));
            }
        })
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Request::Losses {
                rows,
                seq,
                inputs,
                targets,
            } => {
                out.push(b'L');
                put_u32s(&mut out, &[*rows, *seq]);
                put_u32s(&mut out, inputs);
                put_u32s(&mut out, targets);
            }
            Request::Logits { inputs, positions } => {
                out.push(b'G');
                put_u32s(&mut out, &[inputs.len() as u32]);
                put_u32s(&mut out, inputs);
                put_u32s(&mut out, &[positions.len() as u32]);
                put_u32s(&mut out, positions);
            }
            Request::Done => out.push(b'D'),
        }
        out
    }

    pub fn read(r: &mut impl Read) -> Result<Request, ProtocolError> {
        let mut tag = [0u8];
        r.read_exact(&mut tag).map_err(eof_is_closed)?;
        Ok(match tag[0] {
            b'L' => {
                let (rows, seq) = (read_u32(r)?, read_u32(r)?);
                let n = rows.checked_mul(seq).ok_or_else(|| {
                    ProtocolError::Malformed(format!("{rows} rows of {seq} tokens"))
                })?;
                Request::Losses {
                    rows,
                    seq,
                    inputs: read_u32s(r, n)?,
                    targets: read_u32s(r, n)?,
                }
            }
            b'G' => {
                let seq = read_u32(r)?;
                let inputs = read_u32s(r, seq)?;
                let k = read_u32(r)?;
                Request::Logits {
                    inputs,
                    positions: read_u32s(r, k)?,
                }
            }
            b'D' => Request::Done,
            other => {
                return Err(ProtocolError::Malformed(format!(
                    "unknown request {other:#04x}"
                )));
            }
        })
    }
}

/// Writes one frame and flushes it.
pub fn send(w: &mut impl Write, frame: &[u8]) -> Result<(), ProtocolError> {
    w.write_all(frame)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_counts_are_refused() {
        let marks = [
            Mark::Start,
            Mark::Evaluate(TrainStats {
                num_steps: 7,
                eval_batch_rows: 8,
                ..TrainStats::default()
            }),
            Mark::Losses(vec![1.5, 2.0]),
            Mark::Logits(vec![-1.0]),
            Mark::Failed("out of memory".into()),
        ];
        let mut wire: Vec<u8> = marks.iter().flat_map(Mark::encode).collect();
        let mut r = wire.as_slice();
        for m in &marks {
            assert_eq!(&Mark::read(&mut r).unwrap(), m);
        }
        assert!(matches!(Mark::read(&mut r), Err(ProtocolError::Closed)));

        let requests = [
            Request::Losses {
                rows: 1,
                seq: 2,
                inputs: vec![3, 4],
                targets: vec![4, 5],
            },
            Request::Logits {
                inputs: vec![1, 2, 3],
                positions: vec![0, 2],
            },
            Request::Done,
        ];
        wire = requests.iter().flat_map(Request::encode).collect();
        let mut r = wire.as_slice();
        for q in &requests {
            assert_eq!(&Request::read(&mut r).unwrap(), q);
        }
        // A count that would allocate 16 GiB is refused before anything is read.
        let mut huge = vec![b'L'];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Mark::read(&mut huge.as_slice()),
            Err(ProtocolError::Malformed(_))
        ));
        let mut overflow = vec![b'L'];
        put_u32s(&mut overflow, &[1 << 20, 1 << 20]);
        assert!(matches!(
            Request::read(&mut overflow.as_slice()),
            Err(ProtocolError::Malformed(_))
        ));
    }
}
