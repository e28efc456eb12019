//! The admin port's connection budget: at most `--admin-max-connections` open at once, shared
//! fairly between peers, so a flood from one address can neither grow memory without bound nor
//! lock out the kubelet's probes and Prometheus's scrapes (which come from other addresses and
//! open few connections).
//!
//! Below the cap every connection is admitted. At the cap, a new connection from a peer that
//! holds fewer admin connections than the busiest peer takes the busiest peer's oldest
//! connection (which is closed); any other new connection is refused (closed at once). Both are
//! counted. A peer can therefore always get a share, and the flooder pays for its own flood.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// What happened to a new admin connection.
pub(crate) enum Admission {
    /// Room was free.
    Admitted(Slot),
    /// Admitted by closing the busiest peer's oldest connection.
    AdmittedByEviction(Slot),
    /// No room, and this peer already has its share.
    Refused,
}

/// The open admin connections, by peer.
pub(crate) struct AdminSlots {
    capacity: usize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    open: usize,
    next_id: u64,
    by_peer: HashMap<IpAddr, VecDeque<Entry>>,
}

struct Entry {
    id: u64,
    evicted: Arc<Notify>,
}

impl AdminSlots {
    /// A budget of `capacity` connections (at least one).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(AdminSlots {
            capacity: capacity.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many admin connections are open.
    pub fn open(&self) -> usize {
        self.lock().open
    }

    /// Admit or refuse a new connection from `peer`.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Admission {
        let peer = peer.to_canonical();
        let mut table = self.lock();
        let mut evicted = false;
        if table.open >= self.capacity {
            let mine = table.by_peer.get(&peer).map_or(0, VecDeque::len);
            let busiest = table
                .by_peer
                .iter()
                .max_by_key(|(_, entries)| entries.len())
                .map(|(ip, entries)| (*ip, entries.len()));
            match busiest {
                Some((hog, held)) if held > mine + 1 => {
                    let entries = table.by_peer.get_mut(&hog).expect("busiest peer exists");
                    let oldest = entries.pop_front().expect("busiest peer holds connections");
                    if entries.is_empty() {
                        table.by_peer.remove(&hog);
                    }
                    table.open -= 1;
                    oldest.evicted.notify_one();
                    evicted = true;
                }
                _ => return Admission::Refused,
            }
        }
        table.next_id += 1;
        let id = table.next_id;
        let notify = Arc::new(Notify::new());
        table.by_peer.entry(peer).or_default().push_back(Entry {
            id,
            evicted: notify.clone(),
        });
        table.open += 1;
        let slot = Slot {
            slots: self.clone(),
            peer,
            id,
            evicted: notify,
        };
        if evicted {
            Admission::AdmittedByEviction(slot)
        } else {
            Admission::Admitted(slot)
        }
    }
}

/// One admitted connection's place; gives it back when dropped.
pub(crate) struct Slot {
    slots: Arc<AdminSlots>,
    peer: IpAddr,
    id: u64,
    evicted: Arc<Notify>,
}

impl Slot {
    /// Completes when another peer took this connection's place: close it then.
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.slots.lock();
        let Some(entries) = table.by_peer.get_mut(&self.peer) else {
            return; // evicted: already removed
        };
        let Some(at) = entries.iter().position(|e| e.id == self.id) else {
            return;
        };
        entries.remove(at);
        if entries.is_empty() {
            table.by_peer.remove(&self.peer);
        }
        table.open -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_flooding_peer_cannot_lock_out_another() {
        let slots = AdminSlots::new(4);
        let flood: Vec<Slot> = (0..4)
            .map(|_| match slots.admit(ip(2)) {
                Admission::Admitted(slot) => slot,
                _ => panic!("room was free"),
            })
            .collect();
        // The flooder gets nothing more.
        assert!(matches!(slots.admit(ip(2)), Admission::Refused));
        // A probe from elsewhere takes the flooder's oldest connection.
        let probe = match slots.admit(ip(1)) {
            Admission::AdmittedByEviction(slot) => slot,
            _ => panic!("the probe was not admitted"),
        };
        assert_eq!(slots.open(), 4);
        // The oldest flood connection was told to close; dropping it changes nothing more.
        let mut flood = flood.into_iter();
        let oldest = flood.next().unwrap();
        let evicted = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(1), oldest.evicted())
                    .await
                    .is_ok()
            });
        assert!(evicted);
        drop(oldest);
        assert_eq!(slots.open(), 4);
        // Shares even out: 2 and 2, then neither can take from the other.
        let second = match slots.admit(ip(1)) {
            Admission::AdmittedByEviction(slot) => slot,
            _ => panic!("the second probe was not admitted"),
        };
        assert!(matches!(slots.admit(ip(2)), Admission::Refused));
        assert!(matches!(slots.admit(ip(1)), Admission::Refused));
        drop(probe);
        drop(second);
        assert_eq!(slots.open(), 2);
        drop(flood);
        assert_eq!(slots.open(), 0);
        assert!(slots.lock().by_peer.is_empty());
    }
}
