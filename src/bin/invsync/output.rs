//! Standard output for reports and listings.
//!
//! Rust's `println!` panics when the reader has gone away (`invsync snapshots | head -1`), and
//! the default SIGPIPE action would instead kill the process, which must not happen in the
//! middle of a restore or a switchover. So output goes through [`line`]: once standard output
//! is closed, later output is dropped and the command finishes its work and exits with its own
//! status (a `verify db | head` still exits 1 when rows differ). Any other write error (a full
//! disk under `> file`) is kept and reported once at the end by [`check`].

use std::fmt;
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Standard output was closed by its reader, or failed: nothing more is written.
static STOPPED: AtomicBool = AtomicBool::new(false);
/// The first write error other than a closed pipe.
static FAILED: Mutex<Option<std::io::Error>> = Mutex::new(None);

fn write(args: fmt::Arguments<'_>, newline: bool) {
    if STOPPED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| {
        if newline {
            out.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(e) = written {
        STOPPED.store(true, Ordering::Relaxed);
        if e.kind() != ErrorKind::BrokenPipe {
            FAILED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
    }
}

/// Writes `args` and a newline (see the module documentation).
pub fn line(args: fmt::Arguments<'_>) {
    write(args, true)
}

/// Writes `args` without a newline.
pub fn part(args: fmt::Arguments<'_>) {
    write(args, false)
}

/// The write error that made output stop, other than a reader that went away.
pub fn check() -> Result<(), String> {
    if let Err(e) = std::io::stdout().lock().flush() {
        if e.kind() != ErrorKind::BrokenPipe {
            return Err(format!("cannot write to standard output: {e}"));
        }
    }
    match FAILED.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(e) => Err(format!("cannot write to standard output: {e}")),
        None => Ok(()),
    }
}

/// `println!` through [`line`].
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

/// `print!` through [`part`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::part(format_args!($($arg)*))
    };
}
