//! A minimal stderr logger: the monitor logs little, and a VM should not pull in a logging
//! framework for it. Level from `--log-level` or `VME_LOG` (error, warn, info, debug, trace).

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "vme-vmm[{}] {}: {}",
                std::process::id(),
                r.level(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
