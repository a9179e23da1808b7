//! When long work says how far it is in a batch job's log.
//!
//! On a terminal, patchlm's stages draw progress bars (indicatif). Where stderr is no terminal
//! (a batch job's log), indicatif draws nothing; there a stage prints a line instead, at most
//! once per interval: [`LOG_SECS_ENV`] seconds, [`DEFAULT_LOG_SECS`] unless set. [`LogClock`]
//! says when such a line is due; the data, train and eval crates share it.

use crate::{DataError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The environment variable that sets the seconds between progress lines in a log
/// (`PATCHLM_LOG_SECS=600`: one each ten minutes; `0`: one at every step of the work).
pub const LOG_SECS_ENV: &str = "PATCHLM_LOG_SECS";

/// Seconds between progress lines in a log where [`LOG_SECS_ENV`] is not set.
pub const DEFAULT_LOG_SECS: u64 = 60;

/// The interval between progress lines in a log: [`LOG_SECS_ENV`] (whole seconds) or, unset,
/// [`DEFAULT_LOG_SECS`]. A value that is not whole seconds is an error naming the variable.
pub fn log_interval() -> Result<Duration> {
    parse_log_secs(std::env::var_os(LOG_SECS_ENV).as_deref())
}

fn parse_log_secs(value: Option<&std::ffi::OsStr>) -> Result<Duration> {
    match value {
        None => Ok(Duration::from_secs(DEFAULT_LOG_SECS)),
        Some(v) => {
            let text = v.to_string_lossy();
            text.trim().parse::<u64>().map(Duration::from_secs).map_err(|_| {
                DataError::Config(format!(
                    "{LOG_SECS_ENV}={text:?} is not a number of seconds: give whole seconds (e.g. 600) or unset it for a line each {DEFAULT_LOG_SECS} s"
                ))
            })
        }
    }
}

/// Says when a progress line is due in a log: never where lines are off, otherwise once the
/// interval has passed since the clock started or last struck. Shareable between threads.
#[derive(Debug)]
pub struct LogClock {
    every: Option<Duration>,
    last: Mutex<Instant>,
}

impl LogClock {
    /// Lines on where `show` is set and stderr is no terminal (where a progress bar is drawn,
    /// lines would only repeat it), at [`log_interval`] (its default where the variable is
    /// invalid: a program checks it once up front).
    pub fn for_stderr(show: bool) -> Self {
        use std::io::IsTerminal;
        let on = show && !std::io::stderr().is_terminal();
        Self::every(on.then(|| log_interval().unwrap_or(Duration::from_secs(DEFAULT_LOG_SECS))))
    }

    /// A clock striking every `interval`, or never with `None`.
    pub fn every(interval: Option<Duration>) -> Self {
        Self { every: interval, last: Mutex::new(Instant::now()) }
    }

    /// Whether lines are printed at all.
    pub fn is_on(&self) -> bool {
        self.every.is_some()
    }

    /// Whether a line is due now; if so the interval starts again from now.
    pub fn strike(&self) -> bool {
        self.strike_at(Instant::now())
    }

    fn strike_at(&self, now: Instant) -> bool {
        let Some(every) = self.every else { return false };
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if now.saturating_duration_since(*last) < every {
            return false;
        }
        *last = now;
        true
    }

    /// Starts the interval again from now (a line was printed for another reason).
    pub fn restart(&self) {
        *self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
    }
}

/// A progress bar on stderr, or where stderr is no terminal (a batch job's log, where indicatif
/// draws nothing) a line at most once an interval ([`LogClock`]) saying how far the work is.
pub(crate) struct ByteBar {
    pb: ProgressBar,
    log: LogClock,
}

impl ByteBar {
    /// A bar for `total` bytes, named `msg`.
    pub(crate) fn new(total: u64, show: bool, msg: &str) -> Self {
        Self::with_template(
            total,
            show,
            msg,
            "{msg:>10} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
    }

    /// A bar for `total` bytes drawn with indicatif's `template`.
    pub(crate) fn with_template(total: u64, show: bool, msg: &str, template: &str) -> Self {
        let pb = if show { ProgressBar::new(total) } else { ProgressBar::hidden() };
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style);
        }
        pb.set_message(msg.to_string());
        Self { pb, log: LogClock::for_stderr(show) }
    }

    /// `n` more bytes done.
    pub(crate) fn inc(&self, n: u64) {
        self.pb.inc(n);
        self.log_line();
    }

    /// `pos` bytes done.
    pub(crate) fn set_position(&self, pos: u64) {
        self.pb.set_position(pos);
        self.log_line();
    }

    fn log_line(&self) {
        if self.log.strike() {
            eprintln!("{}", self.line());
        }
    }

    /// Where the work stands: `tokenize: 1.50 MiB of 6.16 MiB (24%), 3.00 MiB/s, eta 2 seconds`,
    /// or without a total (a download whose size was not announced) the bytes so far.
    fn line(&self) -> String {
        let (pos, len) = (self.pb.position(), self.pb.length().unwrap_or(0));
        let rate = indicatif::BinaryBytes(self.pb.per_sec() as u64);
        if len == 0 {
            return format!("{}: {} so far, {rate}/s", self.pb.message(), indicatif::BinaryBytes(pos));
        }
        format!(
            "{}: {} of {} ({:.0}%), {rate}/s, eta {}",
            self.pb.message(),
            indicatif::BinaryBytes(pos),
            indicatif::BinaryBytes(len),
            100.0 * pos as f64 / len as f64,
            indicatif::HumanDuration(self.pb.eta())
        )
    }

    /// Names the work now going on (in a log, as a line of its own).
    pub(crate) fn stage(&self, msg: &str) {
        self.pb.set_message(msg.to_string());
        if self.log.is_on() {
            eprintln!("{msg}");
            self.log.restart();
        }
    }

    /// Removes the bar.
    pub(crate) fn finish_and_clear(&self) {
        self.pb.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_strikes_once_per_interval_and_never_when_off() {
        let off = LogClock::every(None);
        assert!(!off.is_on() && !off.strike());
        let zero = LogClock::every(Some(Duration::ZERO));
        assert!(zero.is_on() && zero.strike() && zero.strike());

        let minute = Duration::from_secs(60);
        let clock = LogClock::every(Some(minute));
        let t0 = *clock.last.lock().unwrap();
        assert!(!clock.strike_at(t0 + Duration::from_secs(59)), "struck before its interval");
        assert!(clock.strike_at(t0 + minute));
        assert!(!clock.strike_at(t0 + minute + Duration::from_secs(59)), "struck twice in one interval");
        assert!(clock.strike_at(t0 + 2 * minute + Duration::from_secs(30)));
        // A restart starts the interval again from now (here before its last strike, which was
        // two and a half minutes ahead of now).
        clock.restart();
        let now = Instant::now();
        assert!(clock.strike_at(now + minute));
    }

    #[test]
    fn a_clock_for_stderr_is_on_where_shown_and_no_bar_is_drawn() {
        use std::io::IsTerminal;
        assert!(!LogClock::for_stderr(false).is_on());
        // Under `cargo test` stderr is a terminal or not, as the test was run.
        assert_eq!(LogClock::for_stderr(true).is_on(), !std::io::stderr().is_terminal());
    }

    #[test]
    fn a_byte_bar_line_says_how_far_with_or_without_a_total() {
        // Shown (a hidden bar keeps no total); stderr is no terminal under the test harness, so
        // nothing is drawn, and no line is due within a minute.
        let bar = ByteBar::new(4 << 20, true, "tokenize");
        bar.set_position(1 << 20);
        let line = bar.line();
        assert!(line.starts_with("tokenize: 1.00 MiB of 4.00 MiB (25%), ") && line.contains("/s, eta "), "{line}");
        let unsized_download = ByteBar::new(0, true, "downloading x");
        unsized_download.inc(3 << 10);
        unsized_download.inc(1 << 10);
        let line = unsized_download.line();
        assert!(line.starts_with("downloading x: 4.00 KiB so far, ") && !line.contains('%'), "{line}");
    }

    #[test]
    fn the_interval_is_whole_seconds_or_the_default() {
        let parse = |v: Option<&str>| parse_log_secs(v.map(std::ffi::OsStr::new));
        let err = parse(Some("abc")).unwrap_err().to_string();
        assert!(err.contains("PATCHLM_LOG_SECS=\"abc\" is not a number of seconds"), "{err}");
        assert!(parse(Some("-5")).is_err() && parse(Some("1.5")).is_err());
        assert_eq!(parse(Some(" 600 ")).unwrap(), Duration::from_secs(600));
        assert_eq!(parse(Some("0")).unwrap(), Duration::ZERO);
        assert_eq!(parse(None).unwrap(), Duration::from_secs(DEFAULT_LOG_SECS));
    }
}
