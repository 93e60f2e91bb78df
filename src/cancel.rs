//! Stopping an answer nobody waits for any more: a chat front end's Stop button, a closed tab, a
//! request past its deadline. [`BellaVqa::ask_batch_until`](crate::BellaVqa::ask_batch_until)
//! runs a batch under its caller's stop test, and [`check`] asks that test between the layers of
//! the language model and of the CLIP towers (so a 7B prompt of 32 layers stops within one
//! layer, not after the whole prefill), and so between decoding steps and scoring passes. The
//! test belongs to the thread that answers: other threads, training and plain
//! [`ask`](crate::BellaVqa::ask) never see one.
//!
//! (A Ctrl-C of a long command is [`crate::interrupt`]'s: process-wide, between units of work.)

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::time::Duration;

/// The answer was stopped because its caller's stop test said so.
#[derive(Debug, thiserror::Error)]
#[error("answering was stopped: the asker no longer waits for it")]
pub struct Cancelled;

/// A stop test, its borrow's lifetime erased (see [`until`]).
type StopTest = NonNull<dyn Fn() -> bool>;

thread_local! {
    static STOP: Cell<Option<StopTest>> = const { Cell::new(None) };
}

/// Runs `work` with `stop` as this thread's stop test, asked by every [`check`] inside it.
pub(crate) fn until<R>(stop: &dyn Fn() -> bool, work: impl FnOnce() -> R) -> R {
    /// Puts the previous test back when `work` ends, panics included.
    struct Restore(Option<StopTest>);
    impl Drop for Restore {
        fn drop(&mut self) {
            STOP.with(|s| s.set(self.0));
        }
    }
    // SAFETY: only the lifetime is erased. The pointer is read by `check` on this thread while
    // `work` runs, and `Restore` takes it out before this function returns or unwinds, so it is
    // never read after `stop`'s borrow ends.
    let erased: StopTest = unsafe {
        std::mem::transmute::<NonNull<dyn Fn() -> bool + '_>, StopTest>(NonNull::from(stop))
    };
    let _restore = Restore(STOP.with(|s| s.replace(Some(erased))));
    work()
}

/// For the cancellation tests only: with `BELLA_FAULT_CHECK_DELAY_MS=N` every [`check`] inside
/// a stop test first sleeps N ms, so that the tiny demo model answers slowly enough for a client
/// to leave while it computes.
pub const CHECK_DELAY_ENV: &str = "BELLA_FAULT_CHECK_DELAY_MS";

/// `Err(Cancelled)` when this thread answers under a stop test
/// ([`BellaVqa::ask_batch_until`](crate::BellaVqa::ask_batch_until)) that says stop.
pub fn check() -> Result<(), Cancelled> {
    let Some(test) = STOP.with(Cell::get) else {
        return Ok(());
    };
    static DELAY: OnceLock<Option<u64>> = OnceLock::new();
    if let Some(ms) = *DELAY.get_or_init(|| std::env::var(CHECK_DELAY_ENV).ok()?.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    // SAFETY: set by `until` on this thread, whose borrow of the test lasts while it is set.
    if unsafe { test.as_ref() }() {
        return Err(Cancelled);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_test_holds_inside_its_work_only_and_on_its_thread_only() {
        assert!(check().is_ok(), "no test: never stopped");
        let asked = Cell::new(0);
        let stop = || {
            asked.set(asked.get() + 1);
            asked.get() >= 2
        };
        until(&stop, || {
            assert!(check().is_ok());
            assert!(check().is_err(), "the second check stops");
            // Another thread has no test.
            assert!(std::thread::scope(|s| s
                .spawn(|| check().is_ok())
                .join()
                .unwrap()));
            // A nested test replaces it while its work runs, then it is back.
            until(&|| false, || assert!(check().is_ok()));
            assert!(check().is_err());
        });
        assert_eq!(asked.get(), 3);
        assert!(check().is_ok(), "gone after its work");
        // Also after a panic in the work.
        let unwound = std::panic::catch_unwind(|| until(&|| true, || panic!("in the work")));
        assert!(unwound.is_err());
        assert!(check().is_ok(), "gone after a panic");
    }
}
