#!/usr/bin/env python3
"""Plausible bugs for showing that the loom models bite (see mutants/run.sh).

`mutate.py list` prints the mutant names; `mutate.py NAME` applies one to the
engine sources in the current directory, which must be a throw-away copy of
the repository (run.sh makes one under /tmp). Never run it in your checkout.
Each mutant is (file, exact text, replacement); the text must occur once.
"""
import os
import sys
M = {
 # A: Relaxed instead of Release in RawLock::unlock's fast path
 "A_unlock_fast_relaxed": ("src/memory/park.rs",
   ".compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)",
   ".compare_exchange(LOCKED, 0, Ordering::Relaxed, Ordering::Relaxed)"),
 # B: no re-check of the waiter state after register() in LockSlot::poll
 "B_no_recheck_after_register": ("src/memory/mod.rs",
   """                _ => {
                    waiter.register(cx.waker());
                    // Re-check after registering: a wake-up between the
                    // check above and the registration woke the old waker
                    // (or none).
                    registered = true;
                }""",
   """                _ => {
                    waiter.register(cx.waker());
                    return Poll::Pending;
                }"""),
 # C: wake before the state store in Waiter::complete
 "C_wake_before_state_store": ("src/memory/park.rs",
   """        self.state.store(to, Ordering::Release);
        let mut notify = self.notify.lock();""",
   """        let early = match &*self.notify.lock() {
            Notify::Waker(w) => Wake::Task(w.clone()),
            Notify::Thread(t) => Wake::Thread(t.clone()),
            Notify::None => Wake::Nobody,
        };
        early.wake();
        self.state.store(to, Ordering::Release);
        let mut notify = self.notify.lock();"""),
 # D: a dropped LockSlot that was granted the lock does not pass it on
 "D_cancel_drops_granted_lock": ("src/memory/mod.rs",
   """            if slot.lock.cancel(waiter) {
                // We were handed the lock but will never use it: pass it on.
                slot.lock.unlock();
            }""",
   """            let _ = slot.lock.cancel(waiter);"""),
 # E: Relaxed instead of Release on the hand-off (GRANTED store)
 "E_handoff_store_relaxed": ("src/memory/park.rs",
   "self.state.store(to, Ordering::Release);",
   "self.state.store(to, Ordering::Relaxed);"),
 # F: cancel() forgets to clear QUEUED when it empties the queue.
 # EQUIVALENT (expected to pass every model): a stale QUEUED only sends the
 # next release down the slow path, which finds the queue empty and frees.
 "F_cancel_keeps_queued": ("src/memory/park.rs",
   """                if queue.is_empty() {
                    // Relaxed: see `unlock_slow`.
                    self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                }
                waiter.state.store(CANCELLED, Ordering::Relaxed);""",
   """                waiter.state.store(CANCELLED, Ordering::Relaxed);"""),
 # G: first poll registers the waker after enqueueing (without re-check)
 "G_register_after_enqueue": ("src/memory/mod.rs",
   """            waiter.register(cx.waker());
            return match slot.lock.enqueue(&waiter, Place::Back) {""",
   """            let queued = slot.lock.enqueue(&waiter, Place::Back);
            crate::sync::spin_hint();
            waiter.register(cx.waker());
            return match queued {"""),
 # H: the timed blocking wait ignores a hand-off that raced its cancel
 "H_timeout_ignores_granted": ("src/memory/mod.rs",
   """                    if slot.lock.cancel(&waiter) {
                        return Blocking::Locked;
                    }""",
   """                    let _ = slot.lock.cancel(&waiter);"""),
 # I: the release that empties the queue forgets to clear QUEUED.
 # EQUIVALENT for the same reason as F (a cost, not a bug).
 "I_unlock_slow_keeps_queued": ("src/memory/park.rs",
   """                if queue.is_empty() {
                    // Relaxed: QUEUED is only read by CASes that are
                    // ordered with this one by the queue mutex or by
                    // coherence of the lock word.
                    self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                }""", ""),
 # J: try_lock's CAS Relaxed instead of Acquire
 "J_try_lock_relaxed": ("src/memory/park.rs",
   ".compare_exchange(s, s | LOCKED, Ordering::Acquire, Ordering::Relaxed)",
   ".compare_exchange(s, s | LOCKED, Ordering::Relaxed, Ordering::Relaxed)"),
 # K: recycling rewrites a superseded version that one reader still holds
 "K_recycle_off_by_one": ("src/memory/version.rs",
   """    refs.compare_exchange(1, DRAFT | 1, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()""",
   """    refs.load(Ordering::Acquire) <= 2 && {
        refs.fetch_or(DRAFT, Ordering::Relaxed);
        true
    }"""),
 # L: kill marks waiters KILLED but forgets to wake them
 "L_kill_forgets_wakeups": ("src/memory/park.rs",
   """        for w in wakes {
            w.wake();
        }""",
   """        drop(wakes);"""),
 # M: cancel treats any completed waiter (KILLED too) as granted
 "M_cancel_killed_as_granted": ("src/memory/park.rs",
   "            GRANTED => return true,",
   "            GRANTED | KILLED => return true,"),
 # N: a snapshot trusts its first pointer load (no validation after the
 # increment): a recycled-and-republished allocation can be returned before
 # its publishing store is visible, and a later snapshot goes back a version
 "N_snapshot_no_validation": ("src/memory/slot.rs",
   "if now == p {",
   "if true {"),
 # O: a snapshot takes a reference to an allocation being recycled (ignores
 # the DRAFT bit)
 "O_snapshot_accepts_draft": ("src/memory/version.rs",
   "if prev & DRAFT == 0 {",
   "if true {"),
 # P: the recycling CAS does not acquire the readers' releases
 "P_recycle_relaxed": ("src/memory/version.rs",
   "refs.compare_exchange(1, DRAFT | 1, Ordering::Acquire, Ordering::Relaxed)",
   "refs.compare_exchange(1, DRAFT | 1, Ordering::Relaxed, Ordering::Relaxed)"),
 # R: a woken waiter that is dropped does not pass the wake-up on
 "R_woken_cancel_keeps_wakeup": ("src/memory/park.rs",
   """                if self.state.load(Ordering::Relaxed) & LOCKED == 0 {
                    match queue.pop_front() {""",
   """                if false {
                    match queue.pop_front() {"""),
 # S: a woken waiter that lost the race re-queues at the back (waiters
 # overtake each other)
 "S_woken_requeues_at_back": ("src/memory/park.rs",
   "Place::Front => queue.push_front(waiter.clone()),",
   "Place::Front => queue.push_back(waiter.clone()),"),
 # T: a thread waiter's registration is consumed by its first wake-up (the
 # bug the wake policy found in the first draft)
 "T_thread_wakeup_consumed": ("src/memory/park.rs",
   """        if let Notify::Thread(t) = &*notify {
            // A thread is registered once and for all: keep it, since a
            // woken waiter may re-queue and need waking again.
            return Wake::Thread(t.clone());
        }""", ""),
 # U: releases never hand over, even past the fairness bound
 "U_never_hand_off": ("src/memory/park.rs",
   "Some(head) if handoff_due(&head.since) => {",
   "Some(head) if handoff_due(&head.since) && false => {"),
 # V: a woken waiter does not try the lock before re-queueing.
 # EQUIVALENT (expected to pass every model): `enqueue` takes a free lock
 # itself, under the queue mutex, instead of queueing.
 "V_woken_skips_retry": ("src/memory/mod.rs",
   """                    match slot.lock.try_lock() {
                        TryLock::Acquired => return this.finish(true),
                        TryLock::Dead => return this.finish(false),
                        TryLock::Held => {}
                    }
                    waiter.register(cx.waker());
                    registered = true;""",
   """                    waiter.register(cx.waker());
                    registered = true;"""),
}
if sys.argv[1] == "list":
    print("\n".join(M)); sys.exit()
if not os.path.exists(".loom-mutant"):
    sys.exit("refusing to mutate a checkout: run mutants/run.sh, which works on a copy")
f, old, new = M[sys.argv[1]]
s = open(f).read()
assert s.count(old) == 1, (sys.argv[1], s.count(old))
open(f, "w").write(s.replace(old, new))
