//! Where a training step's time goes: named spans of device time ([`span`]), off unless
//! [`set_profiling`] turns them on.
//!
//! On CUDA a span records a timing event on the device's stream before and after its work and
//! never synchronises, so the step runs as it does unprofiled (the host keeps enqueueing ahead of
//! the GPU) and each span's time is the GPU's, from the end of the work before it to the end of
//! its own (including any wait for the host to enqueue that work, which a host-bound step shows
//! as time in every span). On the CPU, where ops run synchronously, a span is wall-clock time.
//! [`take_profile`] waits for the events and sums the spans by name. Spans do not nest: time a
//! region in one span or in several side by side. Off, a span costs one relaxed atomic load.
//!
//! Names are `pass.kind.detail` (`fwd.matmul.qkv`, `bwd.attention.dkv`): the kind groups them for a
//! comparison with another framework's profile by kernel kind.
//!
//! `cargo xtask bench model --profile` prints one step's spans.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;

static ON: AtomicBool = AtomicBool::new(false);

/// Turns span recording on or off (off by default). Turning it off keeps what was recorded until
/// the next [`take_profile`].
pub fn set_profiling(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether spans are being recorded.
pub fn profiling() -> bool {
    ON.load(Ordering::Relaxed)
}

/// One recorded span: its device time, or a pair of CUDA events around its work.
enum Record {
    Host(Duration),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent, candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

thread_local! {
    /// This thread's spans since the last take (a step's ops are enqueued from one thread).
    static SPANS: RefCell<Vec<(&'static str, Record)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` and, while profiling is on, records its time on `device` under `name`.
pub fn span<T>(
    name: &'static str,
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    if !profiling() {
        return f();
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let stream = d.cuda_stream();
            let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
            let start = stream.record_event(timed).map_err(candle_core::Error::wrap)?;
            let out = f()?;
            let end = stream.record_event(timed).map_err(candle_core::Error::wrap)?;
            SPANS.with(|s| s.borrow_mut().push((name, Record::Cuda(start, end))));
            Ok(out)
        }
        _ => {
            let t0 = Instant::now();
            let out = f()?;
            let t = t0.elapsed();
            SPANS.with(|s| s.borrow_mut().push((name, Record::Host(t))));
            Ok(out)
        }
    }
}

/// The recorded spans summed by name (in the order each name first appeared): total
/// milliseconds and the number of spans.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanTotal {
    /// The span's name.
    pub name: &'static str,
    /// Its total time in milliseconds.
    pub ms: f64,
    /// How many spans of that name were recorded.
    pub calls: usize,
}

/// Waits for the recorded spans' work to finish, sums them by name and clears the record.
pub fn take_profile() -> candle_core::Result<Vec<SpanTotal>> {
    let spans = SPANS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut totals: Vec<SpanTotal> = Vec::new();
    for (name, rec) in spans {
        let ms = match rec {
            Record::Host(t) => t.as_secs_f64() * 1e3,
            #[cfg(feature = "cuda")]
            Record::Cuda(start, end) => f64::from(start.elapsed_ms(&end).map_err(candle_core::Error::wrap)?),
        };
        match totals.iter_mut().find(|t| t.name == name) {
            Some(t) => {
                t.ms += ms;
                t.calls += 1;
            }
            None => totals.push(SpanTotal { name, ms, calls: 1 }),
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_sum_by_name_only_while_on() {
        let dev = Device::Cpu;
        take_profile().unwrap();
        assert_eq!(span("a.x", &dev, || Ok(1)).unwrap(), 1);
        assert!(take_profile().unwrap().is_empty(), "off: nothing recorded");
        set_profiling(true);
        let sleep = |ms| {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(())
        };
        span("fwd.a", &dev, || sleep(3)).unwrap();
        span("fwd.b", &dev, || sleep(1)).unwrap();
        span("fwd.a", &dev, || sleep(2)).unwrap();
        let failed: candle_core::Result<()> = span("fwd.c", &dev, || candle_core::bail!("inner"));
        set_profiling(false);
        assert!(failed.unwrap_err().to_string().contains("inner"));
        let t = take_profile().unwrap();
        let names: Vec<_> = t.iter().map(|s| (s.name, s.calls)).collect();
        // A span whose work fails records nothing; the order is that of first appearance.
        assert_eq!(names, [("fwd.a", 2), ("fwd.b", 1)]);
        assert!(t[0].ms >= 5.0 && t[1].ms >= 1.0 && t[1].ms < t[0].ms, "{t:?}");
        assert!(take_profile().unwrap().is_empty(), "taken: cleared");
    }

    #[test]
    fn recorded_times_sum_to_milliseconds() {
        // Records of known length (the test above can only bound a sleep's from below).
        let record =
            |name, micros| SPANS.with(|s| s.borrow_mut().push((name, Record::Host(Duration::from_micros(micros)))));
        record("bwd.a", 1500);
        record("bwd.b", 250);
        record("bwd.a", 2750);
        record("bwd.a", 1);
        let t = take_profile().unwrap();
        let got: Vec<_> = t.iter().map(|s| (s.name, s.calls)).collect();
        assert_eq!(got, [("bwd.a", 3), ("bwd.b", 1)]);
        assert!((t[0].ms - 4.251).abs() < 1e-9 && (t[1].ms - 0.25).abs() < 1e-9, "{t:?}");
    }
}
