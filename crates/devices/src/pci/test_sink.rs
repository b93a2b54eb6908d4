//! An MSI-X sink for tests: it records every route change and every signalled vector.

use super::msix::{MsiMessage, MsiSink};
use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct Sink {
    pub routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
    pub signals: Mutex<Vec<u16>>,
}

impl MsiSink for Sink {
    fn route(&self, vector: u16, msg: Option<MsiMessage>) {
        self.routes.lock().unwrap().push((vector, msg));
    }
    fn signal(&self, vector: u16) {
        self.signals.lock().unwrap().push(vector);
    }
}
