//! The progress bar of the bulk operator commands (`tern publish --count`,
//! `tern dlq redrive`): drawn on stderr only when stderr is a terminal, so
//! pipes, scripts and tests see their plain line output unchanged.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `len` steps, or nothing when no person is watching.
#[derive(Debug)]
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar labelled `what` (e.g. "publishing") over `len` steps, if
    /// stderr is a terminal and there is more than one step.
    pub(crate) fn new(len: u64, what: &'static str) -> Progress {
        if len < 2 || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        // The template is a constant; a bad one only loses the styling.
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} ({elapsed}, about {eta} left)",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what);
        Progress { bar: Some(bar) }
    }

    /// Whether a bar is drawn (and per-item lines should stay quiet).
    pub(crate) fn is_drawn(&self) -> bool {
        self.bar.is_some()
    }

    /// One more step done.
    pub(crate) fn inc(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Removes the bar, leaving the terminal to the final summary.
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // On an error path the bar must not linger above the error line.
        self.finish();
    }
}
