//! A worker process's gateway calls in flight ([`CallSlots`]): at most `concurrency` at once,
//! the bound on its connections to the gateway (over HTTP/1.1 each call in flight holds one).
//!
//! The process holds more jobs than slots, so jobs wait for one; a free slot goes to the
//! merchants waiting in turn, and within a merchant in the order its jobs asked. A plain
//! FIFO would put one merchant's single payout behind every job of another merchant's
//! payroll already waiting; in turn it waits for about one slot to come free.

use crate::ids::MerchantName;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// The process's call slots, shared by every merchant's lanes in it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CallSlots(Arc<Mutex<State>>);

#[derive(Debug)]
struct State {
    capacity: usize,
    free: usize,
    closed: bool,
    /// Runs waiting for a slot, per merchant (few), each queue in the order they asked.
    waiting: Vec<(MerchantName, VecDeque<oneshot::Sender<CallSlot>>)>,
    /// Where the next hand-over starts looking: the merchant after the one served last.
    turn: usize,
}

/// One slot; given back (to the next waiting run, or as free) when dropped. `None` once
/// disarmed: a slot that could not be handed over is still counted as the one being given
/// back, so its copy must not give itself back too.
#[derive(Debug)]
pub struct CallSlot(Option<Arc<Mutex<State>>>);

impl CallSlots {
    /// `calls` at once (at least one).
    pub fn new(calls: usize) -> Self {
        let state = State {
            capacity: calls.max(1),
            free: calls.max(1),
            closed: false,
            waiting: Vec::new(),
            turn: 0,
        };
        state.show_in_use();
        Self(Arc::new(Mutex::new(state)))
    }

    /// Waits for a slot for a run of `merchant`; `None` once [`CallSlots::close`]d.
    pub async fn take(&self, merchant: &MerchantName) -> Option<CallSlot> {
        let handed = {
            let mut state = lock(&self.0);
            if state.closed {
                return None;
            }
            if state.free > 0 {
                state.free -= 1;
                state.show_in_use();
                return Some(CallSlot(Some(Arc::clone(&self.0))));
            }
            let (tx, rx) = oneshot::channel();
            match state.waiting.iter_mut().find(|(name, _)| name == merchant) {
                Some((_, queue)) => queue.push_back(tx),
                None => state.waiting.push((merchant.clone(), VecDeque::from([tx]))),
            }
            rx
        };
        // A slot handed over after this run stopped waiting is dropped with the channel,
        // which gives it back.
        let slot = handed.await.ok()?;
        // Handed over just before the worker began to stop: given back, not used.
        if lock(&self.0).closed {
            return None;
        }
        Some(slot)
    }

    /// The worker is stopping: runs waiting for a slot get `None` and give their jobs back
    /// unstarted; runs holding one finish.
    pub fn close(&self) {
        let waiting = {
            let mut state = lock(&self.0);
            state.closed = true;
            std::mem::take(&mut state.waiting)
        };
        // Dropping the senders wakes every waiting run with `None`.
        drop(waiting);
    }

    /// At most half the slots in use and no run waiting for one: the process is not busy.
    pub fn quiet(&self) -> bool {
        let state = lock(&self.0);
        state.free * 2 >= state.capacity && state.waiting.iter().all(|(_, q)| q.is_empty())
    }

    /// How many slots there are.
    pub fn capacity(&self) -> usize {
        lock(&self.0).capacity
    }

    /// Slots held now (the gauge shows it outside tests).
    #[cfg(test)]
    fn in_use(&self) -> usize {
        let state = lock(&self.0);
        state.capacity - state.free
    }
}

impl State {
    fn show_in_use(&self) {
        metrics::gauge!(crate::metrics::CALL_SLOTS_IN_USE).set((self.capacity - self.free) as f64);
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let Some(shared) = self.0.take() else {
            return;
        };
        let mut state = lock(&shared);
        let merchants = state.waiting.len();
        // Hand the slot to the next merchant in turn that has a run still waiting.
        for step in 0..merchants {
            let index = (state.turn + step) % merchants;
            while let Some(waiter) = state.waiting[index].1.pop_front() {
                match waiter.send(CallSlot(Some(Arc::clone(&shared)))) {
                    Ok(()) => {
                        state.turn = index + 1;
                        return;
                    }
                    // That run stopped waiting: the copy is disarmed (this one is being
                    // given back, under the lock) and the next waiter tried.
                    Err(mut unwanted) => unwanted.0 = None,
                }
            }
        }
        state.free += 1;
        state.show_in_use();
    }
}

/// The state stays consistent under a panic elsewhere (every change is one statement), so
/// a poisoned lock is used as it is.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn merchant(name: &str) -> MerchantName {
        name.parse().expect("a valid merchant name")
    }

    /// Whether `future` is still pending after the runtime had a chance to run it.
    async fn pending<F: std::future::Future>(future: &mut std::pin::Pin<&mut F>) -> bool {
        tokio::time::timeout(Duration::from_millis(20), future.as_mut())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn no_more_slots_than_the_bound_and_a_dropped_one_is_handed_on() {
        let slots = CallSlots::new(2);
        let a = merchant("a");
        let first = slots.take(&a).await.expect("a slot");
        let _second = slots.take(&a).await.expect("a slot");
        assert_eq!(slots.in_use(), 2);
        let third = slots.take(&a);
        tokio::pin!(third);
        assert!(pending(&mut third).await, "a third slot while two are held");
        drop(first);
        let _third = third.await.expect("the freed slot goes to the waiting run");
        assert_eq!(slots.in_use(), 2);
    }

    #[tokio::test]
    async fn a_free_slot_goes_to_the_next_merchant_in_turn() {
        let slots = CallSlots::new(1);
        let (payroll, urgent) = (merchant("payroll"), merchant("urgent"));
        let held = slots.take(&payroll).await.expect("a slot");
        // The payroll's runs asked first, then one of the other merchant's.
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut runs = Vec::new();
        for (who, name) in [
            ("payroll-1", &payroll),
            ("payroll-2", &payroll),
            ("payroll-3", &payroll),
            ("urgent-1", &urgent),
        ] {
            let (slots, name, order_tx) = (slots.clone(), name.clone(), order_tx.clone());
            runs.push(tokio::spawn(async move {
                let slot = slots.take(&name).await.expect("a slot");
                order_tx.send(who).expect("the test listens");
                drop(slot);
            }));
            // Each asks before the next.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        for run in runs {
            run.await.expect("the run ends");
        }
        let mut served = Vec::new();
        while let Ok(who) = order_rx.try_recv() {
            served.push(who);
        }
        assert_eq!(
            served,
            ["payroll-1", "urgent-1", "payroll-2", "payroll-3"],
            "turns alternate between merchants; each merchant's runs in the order they asked"
        );
    }

    #[tokio::test]
    async fn closing_sends_waiting_runs_away_and_holders_keep_their_slots() {
        let slots = CallSlots::new(1);
        let a = merchant("a");
        let held = slots.take(&a).await.expect("a slot");
        let waiting = tokio::spawn({
            let (slots, a) = (slots.clone(), a.clone());
            async move { slots.take(&a).await.is_none() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        slots.close();
        assert!(
            waiting.await.expect("the run ends"),
            "a waiting run gets no slot"
        );
        assert!(slots.take(&a).await.is_none(), "no slot after closing");
        assert_eq!(slots.in_use(), 1, "the holder keeps its slot");
        drop(held);
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test]
    async fn a_slot_handed_to_a_run_that_then_stopped_waiting_comes_back() {
        let slots = CallSlots::new(1);
        let a = merchant("a");
        let held = slots.take(&a).await.expect("a slot");
        let mut waiter = Box::pin(slots.take(&a));
        assert!(
            pending(&mut waiter.as_mut()).await,
            "queued behind the holder"
        );
        // Handed over while the waiter is not being polled, then the waiter goes away.
        drop(held);
        assert_eq!(slots.in_use(), 1, "in the waiter's hands");
        drop(waiter);
        assert_eq!(slots.in_use(), 0, "the unclaimed slot came back");
        assert!(slots.take(&a).await.is_some());
    }

    #[tokio::test]
    async fn quiet_while_half_the_slots_or_more_are_free_and_no_run_waits() {
        let slots = CallSlots::new(4);
        let first = slots.take(&merchant("a")).await.unwrap();
        let second = slots.take(&merchant("a")).await.unwrap();
        assert!(slots.quiet(), "2 of 4 in use");
        let third = slots.take(&merchant("a")).await.unwrap();
        assert!(!slots.quiet(), "3 of 4 in use");
        drop(third);
        let fourth = slots.take(&merchant("a")).await.unwrap();
        let _fifth = slots.take(&merchant("b")).await.unwrap();
        let b = merchant("b");
        let waiting = slots.take(&b);
        tokio::pin!(waiting);
        assert!(pending(&mut waiting).await);
        drop((first, second));
        // One of the two freed went to the waiting run: 3 of 4 in use.
        assert!(!slots.quiet());
        let _handed = waiting.await.unwrap();
        drop(fourth);
        assert!(slots.quiet(), "2 of 4 in use, none waiting");
    }

    #[tokio::test]
    async fn a_run_that_stopped_waiting_loses_no_slot() {
        let slots = CallSlots::new(1);
        let a = merchant("a");
        let held = slots.take(&a).await.expect("a slot");
        {
            let gone = slots.take(&a);
            tokio::pin!(gone);
            assert!(pending(&mut gone).await);
            // Dropped here: the run stopped waiting (say, its job was aborted).
        }
        let next = slots.take(&a);
        tokio::pin!(next);
        assert!(pending(&mut next).await);
        drop(held);
        let slot = next.await.expect("the slot skips the run that left");
        drop(slot);
        assert_eq!(slots.in_use(), 0, "every slot came back");
    }
}
