//! Connection limits: [`ConnLimits`] counts open connections in total and per client
//! address, and a [`ConnPermit`] holds one connection's place until it is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Open connections, in total and per client address, against their limits (0: none).
#[derive(Debug)]
pub(crate) struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl ConnLimits {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self {
            max_total,
            max_per_ip,
            open: Mutex::default(),
        }
    }

    /// A slot for a new connection from `ip`, or why there is none.
    pub(super) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per_ip) = &mut *open;
        if self.max_total > 0 && *total >= self.max_total {
            return Err("the server has reached its connection limit (limits.max_connections)");
        }
        let mine = per_ip.entry(ip).or_default();
        if self.max_per_ip > 0 && *mine >= self.max_per_ip {
            return Err("too many connections from your address (limits.max_connections_per_ip)");
        }
        *mine += 1;
        *total += 1;
        Ok(ConnPermit {
            connections: Arc::clone(self),
            ip,
        })
    }
}

/// One admitted connection; gives its place back when the connection is dropped.
#[derive(Debug)]
pub(crate) struct ConnPermit {
    connections: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, per_ip) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(mine) = per_ip.get_mut(&self.ip) {
            *mine -= 1;
            if *mine == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}
