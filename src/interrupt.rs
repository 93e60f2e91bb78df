//! Ctrl-C (SIGINT) and SIGTERM during a long command: the first one asks it to stop at its next
//! safe point, keeping what it has done (`train` drops the step in progress and saves a
//! checkpoint of the last finished one; `bench` stops between questions with every answer so far
//! written); a second one ends the process at once, as without this module.
//!
//! The CLI calls [`watch`] for such commands; the library only asks [`requested`] between units
//! of work, which is false unless a watch is installed and a signal came (so library callers and
//! tests are not affected, and the server keeps its own graceful shutdown).

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The signal that asked for the stop (SIGINT until one came).
static SIGNAL: AtomicI32 = AtomicI32::new(SIGINT);
static WATCHING: OnceLock<()> = OnceLock::new();
/// Where the command will stop, for the message printed when the first signal comes.
static AFTER: std::sync::Mutex<&str> = std::sync::Mutex::new("");
/// Whether the handler watches SIGINT (not when the process was started ignoring it).
static WATCHING_SIGINT: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once per process). `after` says where the command will stop, for the
/// message printed when the first signal comes ("at the model's next layer").
pub fn watch(after: &'static str) -> Result<()> {
    stops(after);
    if WATCHING.get().is_some() {
        return Ok(());
    }
    // A SIGINT the process was started ignoring (a background job of a script) stays ignored,
    // as the shell intends.
    let signals = if ignored(SIGINT) {
        vec![SIGTERM]
    } else {
        vec![SIGINT, SIGTERM]
    };
    let mut signals = Signals::new(signals).context("cannot install the Ctrl-C handler")?;
    std::thread::Builder::new()
        .name("interrupt".into())
        .spawn(move || {
            for signal in signals.forever() {
                if !REQUESTED.load(Ordering::SeqCst) {
                    SIGNAL.store(signal, Ordering::SeqCst);
                }
                if REQUESTED.swap(true, Ordering::SeqCst) {
                    // The shell's convention for a process ended by a signal.
                    std::process::exit(128 + signal);
                }
                let after = AFTER.lock().map_or("", |a| *a);
                crate::note!("\nstopping {after} (signal again to stop at once)");
            }
        })
        .context("cannot start the Ctrl-C handler")?;
    WATCHING_SIGINT.store(!ignored(SIGINT), Ordering::SeqCst);
    let _ = WATCHING.set(());
    Ok(())
}

/// Says where the command now stops when the first signal comes (a later stage of it: `bench`
/// computing its metrics after the last question).
pub fn stops(after: &'static str) {
    if let Ok(mut current) = AFTER.lock() {
        *current = after;
    }
}

/// Waits (at most 10 s) until the handler has seen a SIGINT this process just sent itself: the
/// fault injector's Ctrl-C ([`crate::io`]) then lands before the operation it precedes, not a step
/// later on a loaded machine (the handler's thread may lag behind).
pub(crate) fn await_own_sigint() {
    if !WATCHING_SIGINT.load(Ordering::SeqCst) {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !requested() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Whether `signal` is set to be ignored (inherited from the parent process).
fn ignored(signal: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Whether a stop was asked for (always false without [`watch`]).
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// For the interrupt tests only: with `BELLA_FAULT_INTERRUPT_AT_CHECK=N` in the environment the
/// process sends itself one SIGINT (a Ctrl-C) right before its N-th [`check`] (1-based).
pub const CHECK_FAULT_ENV: &str = "BELLA_FAULT_INTERRUPT_AT_CHECK";

/// `Err(Interrupted)` once a stop was asked for: asked between the parts of a unit of work that
/// is dropped when stopped (a training step's passes, which a resumed run makes again; the layers
/// of a question `bench` answers, which the same command asks again).
pub fn check() -> Result<(), Interrupted> {
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    static CHECKS: AtomicU64 = AtomicU64::new(0);
    if let Some(at) = *AT.get_or_init(|| std::env::var(CHECK_FAULT_ENV).ok()?.parse().ok()) {
        if CHECKS.fetch_add(1, Ordering::SeqCst) + 1 == at {
            let _ = signal_hook::low_level::raise(SIGINT);
            await_own_sigint();
        }
    }
    if requested() {
        return Err(Interrupted("interrupted in a training step".into()));
    }
    Ok(())
}

/// The exit status of a command that stopped because it was asked to: the shell's 128 + the
/// signal (130 after a Ctrl-C, 143 after a SIGTERM).
pub fn exit_status() -> u8 {
    (128 + SIGNAL.load(Ordering::SeqCst)) as u8
}

/// A command that stopped early because it was asked to; what it had done is saved. The CLI
/// prints the message and exits with [`exit_status`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);
