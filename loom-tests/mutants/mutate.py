#!/usr/bin/env python3
"""Plausible bugs for showing that the loom models bite (see mutants/run.sh).

`mutate.py list` prints the mutant names; `mutate.py NAME` applies one to the
engine sources in the current directory, which must be a throw-away copy of
the repository (run.sh makes one under /tmp). Never run it in your checkout.

A mutant is (file, edits): each edit is (exact text, replacement), applied in
order, and each text must occur exactly once when it is applied. A mutant may
instead be a list of such variants, for code that is being rewritten: the
first variant whose texts all apply is used (run.sh reports a mutant none of
whose variants applies).

The mutants follow the engine with intrusive waiters (`memory/acquire.rs`:
the one acquisition state machine, `memory/park.rs`: the lock word and its
intrusive queue). A-V are the bugs of the earlier engines, re-expressed
against that code; W-Z and Q (a letter the old list left unused) are bugs of
the intrusive queue itself.
"""
import os
import sys

PARK = "src/memory/park.rs"
ACQ = "src/memory/acquire.rs"

M = {
 # A: Relaxed instead of Release in RawLock::unlock's fast path
 "A_unlock_fast_relaxed": (PARK, [(
   ".compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)",
   ".compare_exchange(LOCKED, 0, Ordering::Relaxed, Ordering::Relaxed)")]),
 # B: no re-check after register: `Acquire::again` returns Busy after
 # `register` without looking at the state it returned (a completion between
 # the state load and the registration woke the previous poll's waker)
 "B_no_recheck_after_register": (ACQ, [(
   """                    By::Task(waker) => match self.lock().register(&self.waiter, waker) {
                        WAITING => return Outcome::Busy,
                        now => state = now,
                    },""",
   """                    By::Task(waker) => {
                        let _ = self.lock().register(&self.waiter, waker);
                        return Outcome::Busy;
                    }""")]),
 # C: `park::complete` wakes the waiter before storing its new state (the
 # woken waiter can see WAITING, and a thread goes back to sleep for good)
 "C_wake_before_state_store": (PARK, [(
   """    unsafe { &(*w).state }.store(to, Ordering::Release);
    wake
}""",
   """    wake.wake();
    unsafe { &(*w).state }.store(to, Ordering::Release);
    Wake::Nobody
}""")]),
 # D: `Drop for Acquire` ignores cancel()'s "you were granted it": a dropped
 # future that was handed the lock does not pass it on
 "D_cancel_drops_granted_lock": (ACQ, [(
   """        if self.cancel() {
            // We were handed the lock but will never use it: pass it on.
            self.lock().unlock();
        }""",
   """        let _ = self.cancel();""")]),
 # E: Relaxed instead of Release on the hand-off (GRANTED) store in
 # `park::complete`
 "E_handoff_store_relaxed": (PARK, [(
   "unsafe { &(*w).state }.store(to, Ordering::Release);",
   "unsafe { &(*w).state }.store(to, Ordering::Relaxed);")]),
 # F: cancel() forgets to clear QUEUED when it empties the queue.
 # EQUIVALENT (expected to pass every model): a stale QUEUED only sends the
 # next release down the slow path, which finds the queue empty and frees.
 "F_cancel_keeps_queued": (PARK, [(
   """                if queue.is_empty() {
                    // Relaxed: see `unlock_slow`.
                    self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                }
                waiter.state.store(CANCELLED, Ordering::Relaxed);""",
   """                waiter.state.store(CANCELLED, Ordering::Relaxed);""")]),
 # G: a task's first step registers its waker after `enqueue` (under the
 # queue mutex, through `register`, without re-checking): a completion
 # between the two finds no waker
 "G_register_after_enqueue": (ACQ, [
   ("""            By::Task(waker) => Notify::Waker(waker.clone()),
            By::Thread => Notify::Thread(current_thread()),""",
    """            By::Task(_) => Notify::None,
            By::Thread => Notify::Thread(current_thread()),"""),
   ("""        let queued = unsafe { self.lock().enqueue(&self.waiter, Place::Back) };""",
    """        let queued = unsafe { self.lock().enqueue(&self.waiter, Place::Back) };
        if let (Outcome::Busy, By::Task(waker)) = (queued, by) {
            crate::sync::spin_hint();
            let _ = self.lock().register(&self.waiter, waker);
        }""")]),
 # H: a timed-out thread (`Acquire::give_up`) ignores a hand-off that raced
 # its cancel
 "H_timeout_ignores_granted": (ACQ, [(
   "            true => Outcome::Locked,",
   "            true => Outcome::Busy,")]),
 # I: the release that empties the queue forgets to clear QUEUED (both
 # branches of `unlock_slow`).
 # EQUIVALENT for the same reason as F (a cost, not a bug).
 "I_unlock_slow_keeps_queued": [
  (PARK, [
   ("let clear = if last { QUEUED } else { 0 };", "let clear = 0;"),
   ("let clear = if last { LOCKED | QUEUED } else { LOCKED };",
    "let clear = LOCKED;")]),
  (PARK, [
   ("""                if due {
                    if last {
                        // Relaxed: QUEUED is only read by CASes that are
                        // ordered with this one by the queue mutex or by
                        // coherence of the lock word.
                        self.state.fetch_and(!QUEUED, Ordering::Relaxed);
                    }""",
    """                let _ = last;
                if due {"""),
   ("let clear = if last { LOCKED | QUEUED } else { LOCKED };",
    "let clear = LOCKED;")]),
 ],
 # J: try_lock's CAS Relaxed instead of Acquire
 "J_try_lock_relaxed": (PARK, [(
   ".compare_exchange(s, s | LOCKED, Ordering::Acquire, Ordering::Relaxed)",
   ".compare_exchange(s, s | LOCKED, Ordering::Relaxed, Ordering::Relaxed)")]),
 # K: recycling rewrites a superseded version that one reader still holds
 "K_recycle_off_by_one": ("src/memory/version.rs", [(
   """    refs.compare_exchange(1, DRAFT | 1, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()""",
   """    refs.load(Ordering::Acquire) <= 2 && {
        refs.fetch_or(DRAFT, Ordering::Relaxed);
        true
    }""")]),
 # L: the drain (kill's, and the watchers' wake-up) completes the waiters
 # (KILLED / WOKEN, unlinked) but never wakes them
 "L_kill_forgets_wakeups": (PARK, [("""            for wake in wakes {
                wake.wake();
            }
            list = mutex.lock();""", """            drop(wakes);
            list = mutex.lock();""")]),
 # M: cancel treats any completed waiter (KILLED too) as granted
 "M_cancel_killed_as_granted": (PARK, [(
   "            GRANTED => return true,",
   "            GRANTED | KILLED => return true,")]),
 # N: a snapshot trusts its first pointer load (no validation after the
 # increment): a recycled-and-republished allocation can be returned before
 # its publishing store is visible, and a later snapshot goes back a version
 "N_snapshot_no_validation": ("src/memory/slot.rs", [(
   "if now == p {",
   "if true {")]),
 # O: a snapshot takes a reference to an allocation being recycled (ignores
 # the DRAFT bit)
 "O_snapshot_accepts_draft": ("src/memory/version.rs", [(
   "if prev & DRAFT == 0 {",
   "if true {")]),
 # P: the recycling CAS does not acquire the readers' releases
 "P_recycle_relaxed": ("src/memory/version.rs", [(
   "refs.compare_exchange(1, DRAFT | 1, Ordering::Acquire, Ordering::Relaxed)",
   "refs.compare_exchange(1, DRAFT | 1, Ordering::Relaxed, Ordering::Relaxed)")]),
 # Q: kill fails only its first batch of waiters (16): the waiters beyond
 # it stay queued on a dead lock, never woken
 "Q_kill_stops_after_first_batch": (PARK, [(
   "self.drain(&self.queue, queue, KILLED, usize::MAX, QUEUED);",
   "self.drain(&self.queue, queue, KILLED, 16, QUEUED);")]),
 # R: a woken waiter that is dropped keeps its wake-up (`cancel` of a WOKEN
 # waiter does not pass it on to the next waiter)
 "R_woken_cancel_keeps_wakeup": (PARK, [(
   """                if self.state.load(Ordering::Relaxed) & LOCKED == 0 {
                    // SAFETY: we hold the mutex.
                    match unsafe { queue.pop_front() } {""",
   """                if false {
                    // SAFETY: we hold the mutex.
                    match unsafe { queue.pop_front() } {""")]),
 # S: a woken waiter that lost the race re-queues at the back (waiters
 # overtake each other)
 "S_woken_requeues_at_back": (PARK, [(
   "Place::Arrival => queue.push_by_arrival(waiter),",
   "Place::Arrival => queue.push_back(waiter),")]),
 # T: `park::complete` takes a thread's registration (`Notify::Thread`) out
 # of the node like a waker: a thread waiter that was woken, lost the race
 # and re-queued is never woken again (the bug the wake policy found in the
 # first draft)
 "T_thread_wakeup_consumed": (PARK, [(
   """        (*w).with_node(|n| match &n.notify {
            // A thread is registered once and for all: keep it, since a
            // woken waiter may re-queue and need waking again.
            Notify::Thread(t) => Wake::Thread(t.clone()),
            _ => match std::mem::replace(&mut n.notify, Notify::None) {
                Notify::Waker(w) => Wake::Task(w),
                _ => Wake::Nobody,
            },
        })""",
   """        (*w).with_node(|n| match std::mem::replace(&mut n.notify, Notify::None) {
            Notify::Waker(w) => Wake::Task(w),
            Notify::Thread(t) => Wake::Thread(t),
            Notify::None => Wake::Nobody,
        })""")]),
 # U: releases never hand over, even past the fairness bound
 "U_never_hand_off": (PARK, [(
   "handoff_due(&n.since)",
   "handoff_due(&n.since) && false")]),
 # V: a woken waiter does not try the lock before re-queueing.
 # EQUIVALENT (expected to pass every model): `enqueue` takes a free lock
 # itself, under the queue mutex, instead of queueing.
 "V_woken_skips_retry": (ACQ, [(
   """                    let tried = self.lock().try_lock();
                    if tried != Outcome::Busy {
                        return tried;
                    }
                    if let By::Task(waker) = by {""",
   """                    if let By::Task(waker) = by {""")]),
 # W: `List::remove` forgets to fix `next.prev`: the next waiter keeps a
 # pointer to the removed one (which its owner then frees), and removing
 # that next waiter later writes through it and leaves `head` on it
 "W_remove_keeps_next_prev": (PARK, [(
   """            match next.is_null() {
                true => self.tail = prev,
                false => (*next).with_node(|n| n.prev = prev),
            }""",
   """            if next.is_null() {
                self.tail = prev;
            }""")]),
 # X: `park::complete` stores the new state before taking the waker out of
 # the node: the owner may see it, reuse or free the node while the
 # completer still reads it
 "X_complete_state_before_waker": (PARK, [
   ("""    let wake = unsafe {
        (*w).with_node(""",
    """    unsafe { &(*w).state }.store(to, Ordering::Release);
    let wake = unsafe {
        (*w).with_node("""),
   ("""    unsafe { &(*w).state }.store(to, Ordering::Release);
    wake
}""",
    """    wake
}""")]),
 # Y: `cancel` of a WAITING waiter marks it CANCELLED but forgets to unlink
 # it: the queue keeps a pointer to a waiter whose owner frees it
 "Y_cancel_keeps_waiter_linked": (PARK, [(
   """                unsafe { queue.remove(waiter) };
""", "")]),
 # Z: `register` replaces the waker without holding the queue mutex (it
 # races the completer, which takes the waker out under the mutex)
 "Z_register_without_mutex": (PARK, [(
   """        let _queue = self.queue.lock();
""", "")]),
 # The watchers (park.rs, "Watchers"; memory/watch.rs).
 # AA: kill sets DEAD with a plain store (the bug the loom model
 # watch_racing_delete_ends_not_found found): ordered before a watcher's
 # CAS that set WATCHED, the store is lost for it, and it waits forever
 "AA_kill_dead_by_plain_store": (PARK, [(
   "let before = self.state.fetch_or(DEAD, Ordering::Release);",
   """let before = self.state.load(Ordering::Relaxed);
        self.state.store(LOCKED | DEAD, Ordering::Release);""")]),
 # AB: a release ignores WATCHED (wakes no watcher)
 "AB_release_ignores_watched": (PARK, [(
   "        if s & (WATCHED | ORPHAN) == WATCHED {",
   "        if false {")]),
 # AC: the release's check of the word is a plain load, not an RMW (a
 # watcher's CAS can then be ordered after it without reading from it)
 "AC_release_checks_with_a_load": (PARK, [(
   "let mut s = self.state.fetch_or(0, Ordering::AcqRel);",
   "let mut s = self.state.load(Ordering::Acquire);")]),
 # AD: the watcher's CAS setting WATCHED is Relaxed (no Acquire on the
 # release it reads: the re-read may miss the published version).
 # EQUIVALENT in the engine as written: the re-read (`MemWatch::check`)
 # starts with `is_dead()`, an Acquire load of the same word, which reads
 # the watcher's own CAS, an RMW in the release sequence of the release it
 # read, and so synchronizes with that release anyway. The CAS keeps its
 # Acquire so that the argument does not hang on that load.
 "AD_watch_cas_relaxed": (PARK, [(
   """                    s | WATCHED,
                    Ordering::AcqRel,
                    Ordering::Acquire,""",
   """                    s | WATCHED,
                    Ordering::Relaxed,
                    Ordering::Relaxed,""")]),
 # AE: the release's CAS loop does not look at ORPHAN again after a
 # failure (a store dropped between the check and the CAS leaks the
 # slot's reference and never ends its watchers)
 "AE_orphan_not_rechecked": (PARK, [(
   """            if s & ORPHAN != 0 {
                // The store is gone""",
   """            if s & ORPHAN != 0 && false {
                // The store is gone""")]),
 # AF: a re-poll keeps the waker of the first poll
 "AF_repoll_keeps_old_waker": (PARK, [(
   """                    Notify::Waker(old) if old.will_wake(waker) => {}
                    _ => n.notify = Notify::Waker(waker.clone()),
                })
            };
            return Outcome::Busy;""",
   """                    _ => {}
                })
            };
            return Outcome::Busy;""")]),
 # AG: kill does not wake the watchers
 "AG_kill_forgets_watchers": (PARK, [(
   """        if before & WATCHED != 0 {
            self.wake_watchers(Budget::All);
        }""", "        let _ = before;")]),
 # AH: a release wakes only the first watcher (one per release)
 "AH_release_wakes_one_watcher": (PARK, [(
   "            Budget::LinkedNow => list.len,",
   "            Budget::LinkedNow => 1,")]),
 # AI: the queue path frees the lock without looking at ORPHAN (the last
 # waiter cancelled after the release read QUEUED, then the store was
 # dropped): a leaked reference and a slot that never ends (a bug older
 # than the watchers, found while reviewing them)
 "AI_queue_path_misses_orphan": (PARK, [(
   "                if before & ORPHAN != 0 {\n                    drop(queue);",
   "                if false {\n                    drop(queue);")]),
 # AJ: ending a slot (the store's drop, or an orphaned holder's release)
 # marks it dead but does not end its watchers
 "AJ_close_forgets_watchers": (PARK, [(
   """        if self.state.fetch_or(DEAD, Ordering::Release) & WATCHED != 0 {
            self.wake_watchers(Budget::All);
        }""", "        self.state.fetch_or(DEAD, Ordering::Release);")]),
 # AK: a release that hands the lock over does not mark it HANDED (only a
 # hint for spinners, but the mark must say how the holder got the lock)
 "AK_handoff_not_marked": (PARK, [(
   "let flip = (if s & HANDED == 0 { HANDED } else { 0 })",
   "let flip = 0")]),
 # AL: the release that frees a lock it was handed (nobody queued) keeps
 # the HANDED mark: a free lock marked handed, and every later release takes
 # the slow path and every newcomer queues without spinning
 "AL_free_keeps_handed": (PARK, [(
   "                s & !(LOCKED | HANDED),\n                Ordering::Release,",
   "                s & !LOCKED,\n                Ordering::Release,")]),
 # AM: a woken waiter that lost the race re-queues at the front (the
 # engine before arrival tickets): two woken losers end up in the order they
 # lost, so the head need not be the oldest waiter
 "AM_woken_requeues_at_front": (PARK, [(
   "while !next.is_null() && (*next).with_node(|n| n.ticket) < ticket {",
   "while false && !next.is_null() && (*next).with_node(|n| n.ticket) < ticket {")]),
}

if sys.argv[1] == "list":
    print("\n".join(M)); sys.exit()
if not os.path.exists(".loom-mutant"):
    sys.exit("refusing to mutate a checkout: run mutants/run.sh, which works on a copy")
variants = M[sys.argv[1]]
if not isinstance(variants, list):
    variants = [variants]
for f, edits in variants:
    s = open(f).read()
    for old, new in edits:
        if s.count(old) != 1:
            break
        s = s.replace(old, new)
    else:
        open(f, "w").write(s)
        sys.exit()
sys.exit(f"{sys.argv[1]}: no variant applies (each text must occur once)")
