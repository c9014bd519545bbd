//! Progress of a long transfer: a bar on stderr when it is a terminal
//! (indicatif), `progress` events with `--json` (a few a second at most),
//! nothing otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report::Reporter;

/// Least time between two `progress` events.
const EVENT_INTERVAL: Duration = Duration::from_millis(250);

pub struct Progress {
    bar: Option<ProgressBar>,
    reporter: Reporter,
    /// `--json` progress events, with the time of the last one.
    events: Option<Option<Instant>>,
    total: Option<u64>,
}

impl Progress {
    /// For `total` bytes (unknown: `None`, a spinner with bytes and rate).
    /// `events`: report `progress` events in JSON mode.
    pub fn new(reporter: &Reporter, total: Option<u64>, events: bool) -> Self {
        let bar = (!reporter.json && !reporter.on_screen() && std::io::stderr().is_terminal())
            .then(|| {
                let (bar, template) = match total {
                    Some(total) => (
                        ProgressBar::new(total),
                        "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                    ),
                    None => (
                        ProgressBar::new_spinner(),
                        "{spinner} {bytes} {binary_bytes_per_sec} {msg}",
                    ),
                };
                bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
                if let Ok(style) = ProgressStyle::with_template(template) {
                    bar.set_style(style);
                }
                bar
            });
        Self {
            bar,
            reporter: reporter.clone(),
            events: (reporter.json && events).then_some(None),
            total,
        }
    }

    /// The bar itself, to wrap a reader (pipe's unknown total).
    pub fn bar(&self) -> Option<&ProgressBar> {
        self.bar.as_ref()
    }

    pub fn set(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
        }
        if let Some(last) = &mut self.events {
            if last.is_none_or(|at| at.elapsed() >= EVENT_INTERVAL) {
                *last = Some(Instant::now());
                self.reporter.progress_bytes(bytes, self.total);
            }
        }
    }

    /// Prints a status line without tearing the bar.
    pub fn println(&self, line: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(line),
            None => line(),
        }
    }

    /// The last figure, always reported; the bar goes away.
    pub fn finish(&mut self, bytes: u64) {
        if let Some(bar) = self.bar.take() {
            bar.set_position(bytes);
            bar.finish_and_clear();
        }
        if self.events.is_some() {
            self.reporter.progress_bytes(bytes, self.total);
        }
    }
}
