//! What the demo tells people while it runs: lines on stderr, above a
//! progress bar when one is drawn (nothing with `--json`), and the formats
//! of durations and rank lists it shares with the report.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Prints progress lines to stderr, unless `--json`.
pub(crate) struct Ui {
    pub(crate) json: bool,
}

impl Ui {
    /// A line above the progress bar `pb`.
    pub(crate) fn say(&self, pb: &ProgressBar, msg: impl AsRef<str>) {
        if !self.json {
            pb.suspend(|| eprintln!("{}", msg.as_ref()));
        }
    }

    /// A line while no progress bar is drawn.
    pub(crate) fn line(&self, msg: impl AsRef<str>) {
        self.say(&ProgressBar::hidden(), msg);
    }

    /// A progress bar of `len` steps (hidden with `--json`).
    pub(crate) fn bar(&self, len: u64, prefix: &'static str) -> ProgressBar {
        if self.json {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "  {prefix:<9} [{bar:36.cyan/blue}] {pos:>4}/{len} steps  {elapsed:>4}  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        pb.set_style(style);
        pb.set_prefix(prefix);
        pb
    }
}

/// "12.3 ms" under a second, "4.56 s" from one.
pub(crate) fn fmt_s(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// "0,1,3".
pub(crate) fn list(ranks: &[usize]) -> String {
    ranks.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}
