//! The training-budget clock: wall-clock time of training steps, excluding the first warm-up
//! steps (compilation, allocator and kernel autotuning), as the original does.

use std::time::{Duration, Instant};

/// Steps with an index up to and including this one are not counted (the original: `step > 10`).
pub const WARMUP_STEPS: u64 = 10;

pub struct BudgetClock {
    budget: Duration,
    warmup_steps: u64,
    step: u64,
    trained: Duration,
    step_start: Option<Instant>,
    /// Called as the first timed step begins (the harness's training-start mark).
    on_start: Option<Box<dyn FnMut() + Send>>,
}

impl BudgetClock {
    pub fn new(budget: Duration) -> Self {
        Self::with_warmup(budget, WARMUP_STEPS)
    }

    pub fn with_warmup(budget: Duration, warmup_steps: u64) -> Self {
        BudgetClock {
            budget,
            warmup_steps,
            step: 0,
            trained: Duration::ZERO,
            step_start: None,
            on_start: None,
        }
    }

    /// Calls `f` once, as the first timed step begins.
    pub fn on_start(&mut self, f: Box<dyn FnMut() + Send>) {
        self.on_start = Some(f);
    }

    /// Call before a step's work. On a GPU, synchronise before `end_step` so the time is real.
    pub fn begin_step(&mut self) {
        if self.step == self.warmup_steps + 1
            && let Some(mut f) = self.on_start.take()
        {
            f();
        }
        self.step_start = Some(Instant::now());
    }

    /// Ends the current step and returns its duration; counts it unless it is a warm-up step.
    pub fn end_step(&mut self) -> Duration {
        let dt = self
            .step_start
            .take()
            .map_or(Duration::ZERO, |t| t.elapsed());
        if self.step > self.warmup_steps {
            self.trained += dt;
        }
        self.step += 1;
        dt
    }

    /// Steps ended so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Counted training time.
    pub fn training_time(&self) -> Duration {
        self.trained
    }

    /// Fraction of the budget spent, in [0, 1]; drives the schedules.
    pub fn progress(&self) -> f64 {
        if self.budget.is_zero() {
            return 1.0;
        }
        (self.trained.as_secs_f64() / self.budget.as_secs_f64()).min(1.0)
    }

    /// True once the counted training time reaches the budget (never during warm-up).
    pub fn exhausted(&self) -> bool {
        self.step > self.warmup_steps && self.trained >= self.budget
    }

    pub fn remaining(&self) -> Duration {
        self.budget.saturating_sub(self.trained)
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_steps_are_not_counted() {
        let mut clock = BudgetClock::with_warmup(Duration::from_millis(30), 2);
        let marks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = marks.clone();
        clock.on_start(Box::new(move || seen.lock().unwrap().push(())));
        for step in 0..3 {
            clock.begin_step();
            assert!(
                marks.lock().unwrap().is_empty(),
                "marked at warm-up step {step}"
            );
            std::thread::sleep(Duration::from_millis(5));
            clock.end_step();
        }
        assert_eq!(clock.training_time(), Duration::ZERO);
        assert_eq!(clock.progress(), 0.0);
        assert!(!clock.exhausted());
        clock.begin_step();
        std::thread::sleep(Duration::from_millis(10));
        clock.end_step();
        assert!(clock.training_time() >= Duration::from_millis(10));
        while !clock.exhausted() {
            clock.begin_step();
            std::thread::sleep(Duration::from_millis(5));
            clock.end_step();
        }
        // The training-start mark: once, as the first timed step (index 3 here) began.
        assert_eq!(marks.lock().unwrap().len(), 1);
        assert_eq!(clock.progress(), 1.0);
        assert!(clock.remaining().is_zero());
    }
}
