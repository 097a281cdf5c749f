//! Postgres-specific behaviour beyond the conformance suite (feature
//! `postgres`): corrupt rows, outages and recovery, schema creation and
//! migration, versions under delete/re-create churn, connection hygiene.
#![cfg(feature = "postgres")]

mod postgres_common;

use std::sync::Arc;
use std::time::Duration;

use ctxstore::{Context, ContextStorage, ContextStorageExt, PostgresContextStorage, Uuid};
use postgres_common::{client, fresh_store, fresh_table, store_on, url};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Job {
    name: String,
    n: u64,
}

impl Context for Job {
    fn kind() -> &'static str {
        "ctxstore.test.pg.job"
    }
}

fn job(n: u64) -> Job {
    Job {
        name: "j".into(),
        n,
    }
}

async fn guarded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("hang guard: test did not finish within 120 s")
}

/// Can another session lock the row right now (NOWAIT)?
async fn row_is_free(table: &str, id: Uuid) -> bool {
    let c = client().await;
    c.batch_execute("BEGIN").await.unwrap();
    let free = c
        .query(
            &format!("SELECT 1 FROM {table} WHERE kind = $1 AND id = $2 FOR UPDATE NOWAIT"),
            &[&Job::kind(), &id],
        )
        .await
        .is_ok();
    c.batch_execute("ROLLBACK").await.unwrap();
    free
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_row_is_a_codec_error_naming_the_key() {
    guarded(async {
        let s = fresh_store().await;
        let id = Uuid::new_v4();
        s.store_context(id, job(1)).await.unwrap();
        // Someone rewrites the row with JSON that is no longer a Job.
        let c = client().await;
        c.execute(
            &format!(
                "UPDATE {} SET value = '{{\"name\": 7}}'::jsonb WHERE id = $1",
                s.table()
            ),
            &[&id],
        )
        .await
        .unwrap();
        let e = s.get_context_snapshot::<Job>(id).await.unwrap_err();
        assert!(e.is_codec(), "{e:?}");
        assert_eq!(e.id(), Some(id));
        assert!(e.to_string().contains(&id.to_string()), "{e}");
        assert!(e.to_string().contains("Job"), "{e}");
        let e = s.get_context::<Job>(id).await.unwrap_err();
        assert!(e.is_codec(), "{e:?}");
        assert_eq!(e.id(), Some(id));
        let e = s
            .update_context(id, |j: &mut Job| j.n += 1)
            .await
            .unwrap_err();
        assert!(e.is_codec(), "{e:?}");
        // The failed lock attempts released the row.
        assert!(row_is_free(s.table(), id).await);
        // Storing over it repairs the context; delete works on it too.
        let v = s.store_context(id, job(5)).await.unwrap();
        let snap = s.get_context_snapshot::<Job>(id).await.unwrap();
        assert_eq!((snap.n, snap.version()), (5, v));
        c.execute(
            &format!(
                "UPDATE {} SET value = '[1, 2]'::jsonb WHERE id = $1",
                s.table()
            ),
            &[&id],
        )
        .await
        .unwrap();
        s.delete_context::<Job>(id).await.unwrap();
        assert!(!s.contains_context::<Job>(id).await.unwrap());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_sessions_give_errors_then_recover() {
    guarded(async {
        let table = fresh_table();
        let s = store_on(&table).await;
        let id = Uuid::new_v4();
        s.store_context(id, job(1)).await.unwrap();
        let mut g = s.get_context::<Job>(id).await.unwrap();
        g.n = 100;
        // What a server restart does to every session of this store.
        let c = client().await;
        let killed: i64 = c
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1",
                &[&format!("ctxstore:{table}")],
            )
            .await
            .unwrap()
            .get(0);
        assert!(killed >= 1);
        // The guard's lock died with its session: the commit is refused and
        // writes nothing.
        let e = g.commit().await.unwrap_err();
        assert!(e.is_lease_lost() || e.is_backend(), "{e:?}");
        assert_eq!(e.id(), Some(id));
        // Idle pooled connections died too: operations may fail with
        // Backend errors for a moment, never panic, and then work again.
        let mut errors = 0;
        let snap = loop {
            match s.get_context_snapshot::<Job>(id).await {
                Ok(snap) => break snap,
                Err(e) => {
                    assert!(e.is_backend(), "{e:?}");
                    errors += 1;
                    assert!(errors < 50, "no recovery: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert_eq!(snap.n, 1, "the refused commit wrote nothing");
        s.update_context(id, |j: &mut Job| j.n += 1).await.unwrap();
        assert_eq!(s.get_context_snapshot::<Job>(id).await.unwrap().n, 2);
    })
    .await
}

#[tokio::test]
async fn unreachable_server_is_a_backend_error() {
    let e = PostgresContextStorage::connect("postgres://postgres@127.0.0.1:1/test")
        .await
        .unwrap_err();
    assert!(e.is_backend(), "{e:?}");
    assert!(e.to_string().contains("cannot connect"), "{e}");
    let e = PostgresContextStorage::connect("not a url")
        .await
        .unwrap_err();
    assert!(
        e.is_backend() && e.to_string().contains("invalid Postgres URL"),
        "{e}"
    );
    let e = PostgresContextStorage::builder(url())
        .table("Robert'); DROP TABLE students;--")
        .connect()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("invalid table name"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_created_once_under_concurrent_connects() {
    guarded(async {
        let table = fresh_table();
        let stores = futures_join_all((0..6).map(|_| {
            let table = table.clone();
            tokio::spawn(async move { store_on(&table).await })
        }))
        .await;
        let id = Uuid::new_v4();
        stores[0].store_context(id, job(3)).await.unwrap();
        for s in &stores {
            assert_eq!(s.get_context_snapshot::<Job>(id).await.unwrap().n, 3);
        }
    })
    .await
}

async fn futures_join_all<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn hand_made_table_is_migrated_and_versions_start_above_its_rows() {
    guarded(async {
        let table = fresh_table();
        let c = client().await;
        // The issue's schema, made by hand, with a row at version 500.
        let id = Uuid::new_v4();
        c.batch_execute(&format!(
            "CREATE TABLE {table} (kind text, id uuid, version bigint, value jsonb, \
             updated_at timestamptz, PRIMARY KEY (kind, id))"
        ))
        .await
        .unwrap();
        c.execute(
            &format!(
                "INSERT INTO {table} VALUES ($1, $2, 500, '{{\"name\":\"old\",\"n\":9}}', now())"
            ),
            &[&Job::kind(), &id],
        )
        .await
        .unwrap();
        let s = store_on(&table).await;
        let snap = s.get_context_snapshot::<Job>(id).await.unwrap();
        assert_eq!((snap.n, snap.version()), (9, 500));
        let v = s.update_context(id, |j: &mut Job| j.n += 1).await;
        v.unwrap();
        assert!(s.get_context_snapshot::<Job>(id).await.unwrap().version() > 500);
        // A fresh key also draws above every stored version.
        assert!(s.store_context(Uuid::new_v4(), job(0)).await.unwrap() > 500);

        // A table that is not ours is refused with a clear error.
        let other = fresh_table();
        c.batch_execute(&format!("CREATE TABLE {other} (kind text, id uuid)"))
            .await
            .unwrap();
        let e = PostgresContextStorage::builder(url())
            .table(&other)
            .connect()
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("missing column `version bigint`"),
            "{e}"
        );
        // Without create_schema, a missing table is an error, not created.
        let e = PostgresContextStorage::builder(url())
            .table(fresh_table())
            .create_schema(false)
            .connect()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("missing column"), "{e}");
    })
    .await
}

/// Versions seen by one reader, in real-time order, never go back, whatever
/// mix of commits, stores, deletes and re-creates runs meanwhile (no ABA).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_never_go_back_under_delete_recreate_churn() {
    guarded(async {
        let s: Arc<dyn ContextStorage> = Arc::new(fresh_store().await);
        let id = Uuid::new_v4();
        s.store_context(id, job(0)).await.unwrap();
        let mut tasks = Vec::new();
        for role in 0..4 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..150u64 {
                    let r = match role {
                        0 => s.delete_context::<Job>(id).await,
                        1 => s.store_context(id, job(i)).await.map(|_| ()),
                        _ => s.update_context(id, |j: &mut Job| j.n += 1).await,
                    };
                    if let Err(e) = r {
                        assert!(e.is_not_found(), "{e:?}");
                    }
                }
            }));
        }
        let reader = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut last = 0;
                let mut seen = 0;
                for _ in 0..600 {
                    match s.get_context_snapshot::<Job>(id).await {
                        Ok(snap) => {
                            assert!(snap.version() >= last, "{} after {last}", snap.version());
                            last = snap.version();
                            seen += 1;
                        }
                        Err(e) => assert!(e.is_not_found(), "{e:?}"),
                    }
                }
                seen
            })
        };
        for t in tasks {
            t.await.unwrap();
        }
        assert!(reader.await.unwrap() > 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waits_are_not_cut_by_the_statement_timeout() {
    guarded(async {
        let s = PostgresContextStorage::builder(url())
            .table(fresh_table())
            .statement_timeout(Duration::from_millis(200))
            .connect()
            .await
            .unwrap();
        let s = Arc::new(s);
        let id = Uuid::new_v4();
        s.store_context(id, job(0)).await.unwrap();
        let g = s.get_context::<Job>(id).await.unwrap();
        let mut waiters = Vec::new();
        for op in 0..3 {
            let s = s.clone();
            waiters.push(tokio::spawn(async move {
                match op {
                    0 => s.update_context(id, |j: &mut Job| j.n += 1).await,
                    1 => s.store_context(id, job(10)).await.map(|_| ()),
                    _ => s
                        .get_context_timeout::<Job>(id, Duration::from_secs(30))
                        .await
                        .map(|g| g.rollback()),
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        drop(g);
        for w in waiters {
            w.await.unwrap().unwrap();
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_go_back_to_the_pool_clean() {
    guarded(async {
        let table = fresh_table();
        let s = PostgresContextStorage::builder(url())
            .table(&table)
            .pool_size(1)
            .connect()
            .await
            .unwrap();
        let other = store_on(&table).await;
        let id = Uuid::new_v4();
        s.store_context(id, job(0)).await.unwrap();
        for round in 0..20u64 {
            // Dropped (rolled back) guards, NotFound and WouldBlock paths,
            // and a cancelled waiter all leave the single connection clean.
            let mut g = s.get_context::<Job>(id).await.unwrap();
            g.n = 999;
            drop(g);
            assert!(s
                .get_context::<Job>(Uuid::new_v4())
                .await
                .unwrap_err()
                .is_not_found());
            let held = other.get_context::<Job>(id).await.unwrap();
            assert!(s
                .try_get_context::<Job>(id)
                .await
                .unwrap_err()
                .is_would_block());
            assert!(s
                .get_context_timeout::<Job>(id, Duration::from_millis(20))
                .await
                .unwrap_err()
                .is_timeout());
            let cancelled =
                tokio::time::timeout(Duration::from_millis(20), s.get_context::<Job>(id)).await;
            assert!(cancelled.is_err());
            held.rollback();
            // A commit through the one connection is visible to another
            // session, so it was not left inside an old transaction.
            s.update_context(id, |j: &mut Job| j.n += 1).await.unwrap();
            assert_eq!(
                other.get_context_snapshot::<Job>(id).await.unwrap().n,
                round + 1
            );
            assert!(row_is_free(&table, id).await);
        }
    })
    .await
}

#[test]
fn guards_work_from_plain_threads() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(fresh_store());
    let id = Uuid::new_v4();
    rt.block_on(s.store_context(id, job(0))).unwrap();
    let table = s.table().to_owned();
    // Commit on a plain thread (commit_blocking), then drop one there.
    let g = rt.block_on(s.get_context::<Job>(id)).unwrap();
    let v = std::thread::spawn(move || {
        let mut g = g;
        g.n = 7;
        g.commit_blocking().unwrap()
    })
    .join()
    .unwrap();
    let g = rt.block_on(s.get_context::<Job>(id)).unwrap();
    std::thread::spawn(move || drop(g)).join().unwrap();
    rt.block_on(async {
        // The release was spawned on the store's runtime; the lock frees.
        let g = s
            .get_context_timeout::<Job>(id, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!((g.n, g.version()), (7, v));
        g.rollback();
        let mut free = false;
        for _ in 0..100 {
            if row_is_free(&table, id).await {
                free = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(free);
    });
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Reading {
    label: String,
    value: f64,
    extra: Option<f32>,
    tags: std::collections::BTreeMap<String, f64>,
}

impl Context for Reading {
    fn kind() -> &'static str {
        "ctxstore.test.pg.reading"
    }
}

fn reading() -> Reading {
    Reading {
        label: "ok".into(),
        value: 1.5,
        extra: Some(2.5),
        tags: [("t".to_owned(), 3.0)].into(),
    }
}

/// Values the in-memory store takes but JSON (or jsonb) cannot carry back.
fn unportable_readings() -> Vec<Reading> {
    let mut out = Vec::new();
    for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        out.push(Reading {
            value: v,
            ..reading()
        });
    }
    out.push(Reading {
        extra: Some(f32::NAN),
        ..reading()
    });
    out.push(Reading {
        tags: [("t".to_owned(), f64::NAN)].into(),
        ..reading()
    });
    out.push(Reading {
        label: "nul\0inside".into(),
        ..reading()
    });
    out.push(Reading {
        tags: [("k\0".to_owned(), 1.0)].into(),
        ..reading()
    });
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_non_finite_floats_and_nul_strings_are_refused_at_write_time() {
    guarded(async {
        let s = fresh_store().await;
        for bad in unportable_readings() {
            let id = Uuid::new_v4();
            let e = s.store_context(id, bad.clone()).await.unwrap_err();
            assert!(e.is_codec(), "{bad:?}: {e}");
            assert_eq!(e.id(), Some(id));
            assert!(e.to_string().contains(&id.to_string()), "{e}");
            assert!(!s.contains_context::<Reading>(id).await.unwrap());
            // Through a guard: refused, nothing written, the lock released.
            let v = s.store_context(id, reading()).await.unwrap();
            let mut g = s.get_context::<Reading>(id).await.unwrap();
            *g = bad.clone();
            let e = g.commit().await.unwrap_err();
            assert!(e.is_codec(), "{bad:?}: {e}");
            assert_eq!(e.id(), Some(id));
            let snap = s.get_context_snapshot::<Reading>(id).await.unwrap();
            assert_eq!((&*snap, snap.version()), (&reading(), v));
            s.get_context_timeout::<Reading>(id, Duration::from_secs(30))
                .await
                .unwrap()
                .rollback();
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Issue #15: pool deadlocks, URL options, least privilege, timeouts.

/// The test URL with `params` appended as query parameters.
fn url_with(params: &str) -> String {
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{params}")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

async fn elapsed<F: std::future::Future>(what: &str, secs: u64, f: F) -> (F::Output, Duration) {
    let t0 = std::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(out) => (out, t0.elapsed()),
        Err(_) => panic!("{what} did not finish within {secs} s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue15_waiters_on_a_held_key_leave_the_pool_usable() {
    guarded(async {
        let table = fresh_table();
        let s = Arc::new(
            PostgresContextStorage::builder(url())
                .table(&table)
                .pool_size(4)
                .connect()
                .await
                .unwrap(),
        );
        let (hot, cold) = (Uuid::new_v4(), Uuid::new_v4());
        s.store_context(hot, job(0)).await.unwrap();
        s.store_context(cold, job(0)).await.unwrap();
        let held = s.get_context::<Job>(hot).await.unwrap();
        let mut waiters = Vec::new();
        for i in 0..64 {
            let s = s.clone();
            waiters.push(tokio::spawn(async move {
                match i % 3 {
                    0 => s.update_context(hot, |j: &mut Job| j.n += 1).await,
                    1 => s.store_context(hot, job(0)).await.map(drop),
                    _ => s.get_context::<Job>(hot).await.map(|g| g.rollback()),
                }
            }));
        }
        // Let them all queue.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut took = Vec::new();
        for round in 0..5u64 {
            let (r, t) = elapsed("guard on another key", 10, async {
                let mut g = s.get_context::<Job>(cold).await?;
                g.n += 1;
                g.commit().await
            })
            .await;
            r.unwrap();
            took.push(t);
            let (r, t) = elapsed(
                "snapshot of the held key",
                10,
                s.get_context_snapshot::<Job>(hot),
            )
            .await;
            assert_eq!(r.unwrap().n, 0);
            took.push(t);
            let (r, t) = elapsed(
                "snapshot of another key",
                10,
                s.get_context_snapshot::<Job>(cold),
            )
            .await;
            assert_eq!(r.unwrap().n, round + 1);
            took.push(t);
            let (r, t) = elapsed(
                "try_get_context on the held key",
                10,
                s.try_get_context::<Job>(hot),
            )
            .await;
            assert!(r.unwrap_err().is_would_block());
            took.push(t);
            let (r, t) = elapsed(
                "get_context_timeout on the held key",
                10,
                s.get_context_timeout::<Job>(hot, Duration::from_millis(50)),
            )
            .await;
            assert!(r.unwrap_err().is_timeout());
            took.push(t);
            let (r, t) = elapsed(
                "store of a new key",
                10,
                s.store_context(Uuid::new_v4(), job(1)),
            )
            .await;
            r.unwrap();
            took.push(t);
        }
        let slowest = took.iter().max().unwrap();
        eprintln!("64 queued waiters, pool 4: slowest other operation {slowest:?}");
        drop(held);
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        let snap = s.get_context_snapshot::<Job>(hot).await.unwrap();
        assert!(snap.n <= 22, "{}", snap.n);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_a_waiter_does_not_deadlock_its_holder_on_a_small_pool() {
    guarded(async {
        let s = Arc::new(
            PostgresContextStorage::builder(url())
                .table(fresh_table())
                .pool_size(2)
                .connect()
                .await
                .unwrap(),
        );
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        s.store_context(a, job(0)).await.unwrap();
        s.store_context(b, job(0)).await.unwrap();
        let mut held = s.get_context::<Job>(a).await.unwrap();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.update_context(a, |j: &mut Job| j.n += 1).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The holder needs a second connection while a waiter queues on A.
        let (r, _) = elapsed(
            "holder updating B",
            10,
            s.update_context(b, |j: &mut Job| j.n += 1),
        )
        .await;
        r.unwrap();
        held.n = 10;
        held.commit().await.unwrap();
        elapsed("waiter", 10, waiter).await.0.unwrap().unwrap();
        assert_eq!(s.get_context_snapshot::<Job>(a).await.unwrap().n, 11);

        // Pool of one, its connection held by a guard: other keys are
        // refused or time out instead of hanging, and snapshots still work.
        let one = PostgresContextStorage::builder(url())
            .table(fresh_table())
            .pool_size(1)
            .connect()
            .await
            .unwrap();
        one.store_context(a, job(0)).await.unwrap();
        one.store_context(b, job(0)).await.unwrap();
        let g = one.get_context::<Job>(a).await.unwrap();
        let (r, _) = elapsed(
            "try_get_context, pool exhausted",
            10,
            one.try_get_context::<Job>(b),
        )
        .await;
        assert!(r.unwrap_err().is_would_block());
        let (r, _) = elapsed(
            "get_context_timeout, pool exhausted",
            10,
            one.get_context_timeout::<Job>(b, Duration::from_millis(100)),
        )
        .await;
        assert!(r.unwrap_err().is_timeout());
        let (r, _) = elapsed(
            "snapshot, pool exhausted",
            10,
            one.get_context_snapshot::<Job>(b),
        )
        .await;
        assert_eq!(r.unwrap().n, 0);
        let (r, _) = elapsed(
            "contains, pool exhausted",
            10,
            one.contains_context::<Job>(a),
        )
        .await;
        assert!(r.unwrap());
        g.rollback();
        one.update_context(b, |j: &mut Job| j.n += 1).await.unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_url_options_are_kept_next_to_the_statement_timeout() {
    guarded(async {
        let schema = unique("ctx_schema");
        let c = client().await;
        c.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let table = fresh_table();
        let result = async {
            let s = PostgresContextStorage::builder(url_with(&format!(
                "options=-c%20search_path%3D{schema}"
            )))
            .table(&table)
            .statement_timeout(Duration::from_secs(7))
            .connect()
            .await?;
            let id = Uuid::new_v4();
            s.store_context(id, job(1)).await?;
            s.update_context(id, |j: &mut Job| j.n += 1).await?;
            s.get_context_snapshot::<Job>(id).await.map(|snap| snap.n)
        }
        .await;
        let found = c
            .query(
                "SELECT schemaname::text FROM pg_tables WHERE tablename = $1",
                &[&table],
            )
            .await
            .unwrap();
        let schemas: Vec<String> = found.iter().map(|r| r.get(0)).collect();
        c.batch_execute(&format!(
            "DROP SCHEMA {schema} CASCADE; DROP TABLE IF EXISTS public.{table}; \
             DROP SEQUENCE IF EXISTS public.{table}_version_seq"
        ))
        .await
        .unwrap();
        assert_eq!(result.unwrap(), 2);
        assert_eq!(schemas, vec![schema], "the URL's search_path was dropped");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_a_least_privilege_role_connects_to_an_existing_table() {
    guarded(async {
        let table = fresh_table();
        // The owner (a migration tool, say) creates the schema...
        let owner = store_on(&table).await;
        let id = Uuid::new_v4();
        owner.store_context(id, job(1)).await.unwrap();
        drop(owner);
        // ...and the application's role may only read and write rows.
        let role = unique("ctx_app_role");
        let c = client().await;
        c.batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}; \
             GRANT USAGE, SELECT, UPDATE ON SEQUENCE {table}_version_seq TO {role}"
        ))
        .await
        .unwrap();
        let app_url = url().replacen("postgres@", &format!("{role}@"), 1);
        assert_ne!(app_url, url(), "the test URL must name the user postgres");
        // A watcher with full rights (the owner's store).
        let owner = store_on(&table).await;
        let mut w = owner.watch_context::<Job>(id).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().n, 1);
        let result = async {
            // The default create_schema(true) must not need ownership.
            let s = PostgresContextStorage::builder(&app_url)
                .table(&table)
                .connect()
                .await?;
            s.update_context(id, |j: &mut Job| j.n += 1).await?;
            let fresh = Uuid::new_v4();
            s.store_context(fresh, job(5)).await?;
            s.delete_context::<Job>(fresh).await?;
            // No rights on the watch registry: this role cannot watch...
            let e = s.watch_context::<Job>(id).await.unwrap_err();
            assert!(e.is_backend() && e.to_string().contains("registry"), "{e}");
            s.get_context_snapshot::<Job>(id).await.map(|snap| snap.n)
        }
        .await;
        // ...but its writes still wake the watchers of other roles (it
        // notifies on every write).
        let seen = next(&mut w).await.map(|snap| snap.n);
        drop(w);
        drop(owner);
        c.batch_execute(&format!(
            "DROP TABLE {table}; DROP TABLE {table}_watch; DROP SEQUENCE {table}_version_seq; \
             DROP OWNED BY {role}; DROP ROLE {role}"
        ))
        .await
        .unwrap();
        assert_eq!(result.unwrap(), 2);
        assert_eq!(seen.unwrap(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_reserved_words_work_as_table_names() {
    guarded(async {
        let schema = unique("ctx_schema");
        let c = client().await;
        c.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let result = async {
            let mut out = Vec::new();
            for table in ["user", "order"] {
                let s = PostgresContextStorage::builder(url_with(&format!(
                    "options=-c%20search_path%3D{schema}"
                )))
                .table(table)
                .connect()
                .await?;
                let id = Uuid::new_v4();
                s.store_context(id, job(1)).await?;
                s.update_context(id, |j: &mut Job| j.n += 1).await?;
                out.push(s.get_context_snapshot::<Job>(id).await?.n);
                assert_eq!(s.context_ids::<Job>().await?, vec![id]);
                s.delete_context::<Job>(id).await?;
            }
            Ok::<_, ctxstore::ContextError>(out)
        }
        .await;
        c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
        assert_eq!(result.unwrap(), vec![2, 2]);
    })
    .await
}

/// A loopback TCP proxy to Postgres that can freeze: while frozen it keeps
/// every connection open but forwards nothing (a half-open network).
mod frozen_proxy {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    pub struct Proxy {
        pub addr: SocketAddr,
        frozen: watch::Sender<bool>,
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut frozen: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.wait_for(|f| !*f).await.is_err() {
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    impl Proxy {
        pub async fn start(target: SocketAddr) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (frozen, rx) = watch::channel(false);
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::spawn(pump(ir, ow, rx.clone()));
                    tokio::spawn(pump(or, iw, rx.clone()));
                }
            });
            Proxy { addr, frozen }
        }

        pub fn freeze(&self) {
            self.frozen.send_replace(true);
        }

        pub fn thaw(&self) {
            self.frozen.send_replace(false);
        }
    }
}

fn pg_addr() -> std::net::SocketAddr {
    let cfg: tokio_postgres::Config = url().parse().unwrap();
    let host = match &cfg.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => "127.0.0.1".to_owned(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let host = if host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        host
    };
    format!("{host}:{port}").parse().unwrap()
}

fn url_via(addr: std::net::SocketAddr) -> String {
    let cfg: tokio_postgres::Config = url().parse().unwrap();
    let user = cfg.get_user().unwrap_or("postgres");
    let db = cfg.get_dbname().unwrap_or("test");
    format!("postgres://{user}@{}:{}/{db}", addr.ip(), addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue15_a_half_open_network_does_not_hang_commits_or_reads() {
    guarded(async {
        let proxy = frozen_proxy::Proxy::start(pg_addr()).await;
        // Only the statement timeout is set: the client-side bounds must
        // follow from it by default.
        let s = PostgresContextStorage::builder(url_via(proxy.addr))
            .table(fresh_table())
            .statement_timeout(Duration::from_secs(1))
            .connect()
            .await
            .unwrap();
        let id = Uuid::new_v4();
        s.store_context(id, job(1)).await.unwrap();
        let mut g = s.get_context::<Job>(id).await.unwrap();
        g.n = 2;
        proxy.freeze();
        let (r, t) = elapsed("commit over a frozen network", 60, g.commit()).await;
        let e = r.unwrap_err();
        assert!(e.is_backend(), "{e:?}");
        assert_eq!(e.id(), Some(id));
        eprintln!("commit over a frozen network failed after {t:?}: {e}");
        let (r, t) = elapsed(
            "snapshot over a frozen network",
            60,
            s.get_context_snapshot::<Job>(id),
        )
        .await;
        let e = r.unwrap_err();
        assert!(e.is_backend(), "{e:?}");
        eprintln!("snapshot over a frozen network failed after {t:?}: {e}");
        proxy.thaw();
        // The store recovers (dead connections were dropped).
        let snap = elapsed("recovery", 60, async {
            loop {
                match s.get_context_snapshot::<Job>(id).await {
                    Ok(snap) => break snap,
                    Err(e) if e.is_backend() => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(e) => panic!("{e:?}"),
                }
            }
        })
        .await
        .0;
        assert!(snap.n == 1 || snap.n == 2, "{}", snap.n);
    })
    .await
}

#[tokio::test]
async fn issue15_connecting_to_a_server_that_never_answers_times_out() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            open.push(sock);
        }
    });
    // Default settings: the connect timeout must be there by default.
    let (r, t) = elapsed(
        "connect to a silent server",
        60,
        PostgresContextStorage::connect(&url_via(addr)),
    )
    .await;
    let e = r.unwrap_err();
    assert!(e.is_backend(), "{e:?}");
    eprintln!("connect to a silent server failed after {t:?}: {e}");
    hold.abort();
}

// ---------------------------------------------------------------------
// Watching (issue #12): LISTEN/NOTIFY, incarnations, outages.
// ---------------------------------------------------------------------

/// The next `changed()`, failing the test if it takes more than 30 s.
async fn next(w: &mut ctxstore::ContextWatch<Job>) -> ctxstore::Result<ctxstore::Snapshot<Job>> {
    tokio::time::timeout(Duration::from_secs(30), w.changed())
        .await
        .expect("changed() did not return within 30 s")
}

/// Whether `changed()` stays pending for `ms` (no new version reported).
async fn stays_quiet(w: &mut ctxstore::ContextWatch<Job>, ms: u64) -> bool {
    match tokio::time::timeout(Duration::from_millis(ms), w.changed()).await {
        Err(_) => true,
        Ok(r) => {
            eprintln!("changed() returned {:?}", r.map(|s| (s.version(), s.n)));
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_versions_strictly_increase_reach_the_last_then_not_found() {
    guarded(async {
        let s = fresh_store().await;
        let id = Uuid::new_v4();
        let v0 = s.store_context(id, job(0)).await.unwrap();
        let mut w = s.watch_context::<Job>(id).await.unwrap();
        // The current version first, at once.
        let first = next(&mut w).await.unwrap();
        assert_eq!((first.n, first.version()), (0, v0));
        const N: u64 = 60;
        let writer = s.clone();
        let writes = tokio::spawn(async move {
            for i in 0..N {
                // A mix of every writer: guards, stores, conditional stores.
                match i % 3 {
                    0 => writer
                        .update_context(id, |j: &mut Job| j.n += 1)
                        .await
                        .unwrap(),
                    1 => {
                        let n = writer.get_context_snapshot::<Job>(id).await.unwrap().n;
                        writer.store_context(id, job(n + 1)).await.unwrap();
                    }
                    _ => {
                        let snap = writer.get_context_snapshot::<Job>(id).await.unwrap();
                        writer
                            .store_context_if(id, snap.version(), job(snap.n + 1))
                            .await
                            .unwrap();
                    }
                }
            }
        });
        let (mut last_v, mut last_n, mut seen) = (first.version(), 0, 0);
        while last_n < N {
            let snap = next(&mut w).await.unwrap();
            assert!(snap.version() > last_v, "{} after {last_v}", snap.version());
            assert!(snap.n > last_n, "value {} after {last_n}", snap.n);
            (last_v, last_n) = (snap.version(), snap.n);
            seen += 1;
        }
        writes.await.unwrap();
        // The writer has stopped: the watcher holds the final version...
        let fin = s.get_context_snapshot::<Job>(id).await.unwrap();
        assert_eq!((last_n, last_v), (fin.n, fin.version()));
        eprintln!("watcher saw {seen} of {N} versions");
        // ...and nothing more comes.
        assert!(stays_quiet(&mut w, 300).await);
        s.delete_context::<Job>(id).await.unwrap();
        let e = next(&mut w).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        assert_eq!(e.id(), Some(id));
        // For good, even once the id is used again.
        s.store_context(id, job(7)).await.unwrap();
        assert!(w.changed().await.unwrap_err().is_not_found());
        // A watch of an unknown id is NotFound at once.
        let e = s.watch_context::<Job>(Uuid::new_v4()).await.unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_the_commits_of_another_store_instance() {
    guarded(async {
        // Two stores on one table stand for two processes.
        let table = fresh_table();
        let watching = store_on(&table).await;
        let writing = store_on(&table).await;
        let id = Uuid::new_v4();
        writing.store_context(id, job(1)).await.unwrap();
        let mut w = watching.watch_context::<Job>(id).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().n, 1);
        // A guard's commit.
        let mut g = writing.get_context::<Job>(id).await.unwrap();
        g.n = 2;
        let v = g.commit().await.unwrap();
        let snap = next(&mut w).await.unwrap();
        assert_eq!((snap.n, snap.version()), (2, v));
        // A plain store.
        let v = writing.store_context(id, job(3)).await.unwrap();
        let snap = next(&mut w).await.unwrap();
        assert_eq!((snap.n, snap.version()), (3, v));
        // A conditional store.
        let v = writing.store_context_if(id, v, job(4)).await.unwrap();
        let snap = next(&mut w).await.unwrap();
        assert_eq!((snap.n, snap.version()), (4, v));
        // A conditional delete.
        writing.delete_context_if::<Job>(id, v).await.unwrap();
        assert!(next(&mut w).await.unwrap_err().is_not_found());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_does_not_follow_a_context_deleted_and_created_again() {
    guarded(async {
        let table = fresh_table();
        let s = store_on(&table).await;
        let other = store_on(&table).await;
        for recreate in ["store_context", "store_context_if(0)", "delete_if + store"] {
            let id = Uuid::new_v4();
            s.store_context(id, job(1)).await.unwrap();
            let mut w = s.watch_context::<Job>(id).await.unwrap();
            let first = next(&mut w).await.unwrap();
            // Deleted and created again while the watcher is not looking:
            // the row it re-reads has a higher version, but it is another
            // context.
            match recreate {
                "store_context" => {
                    other.delete_context::<Job>(id).await.unwrap();
                    other.store_context(id, job(2)).await.unwrap();
                }
                "store_context_if(0)" => {
                    other.delete_context::<Job>(id).await.unwrap();
                    other.store_context_if(id, 0, job(2)).await.unwrap();
                }
                _ => {
                    other
                        .delete_context_if::<Job>(id, first.version())
                        .await
                        .unwrap();
                    s.store_context(id, job(2)).await.unwrap();
                }
            }
            let e = next(&mut w).await.unwrap_err();
            assert!(e.is_not_found(), "{recreate}: {e:?}");
            assert!(w.changed().await.unwrap_err().is_not_found(), "{recreate}");
            // The new context is watched by a new watch.
            let mut w2 = s.watch_context::<Job>(id).await.unwrap();
            assert_eq!(next(&mut w2).await.unwrap().n, 2, "{recreate}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_no_version_for_rollbacks_and_refused_conditional_writes() {
    guarded(async {
        let table = fresh_table();
        let s = store_on(&table).await;
        let id = Uuid::new_v4();
        let v = s.store_context(id, job(1)).await.unwrap();
        let mut w = s.watch_context::<Job>(id).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().version(), v);

        // A watcher waiting holds no row lock: writers go straight through.
        let watcher = tokio::spawn(async move {
            let snap = next(&mut w).await.unwrap();
            (w, snap)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(row_is_free(&table, id).await);
        let g = s.try_get_context::<Job>(id).await.unwrap();
        g.rollback();
        let v = s.store_context(id, job(2)).await.unwrap();
        let (mut w, snap) = watcher.await.unwrap();
        assert_eq!((snap.n, snap.version()), (2, v));

        // A guard dropped with changes: rolled back, no version.
        let mut g = s.get_context::<Job>(id).await.unwrap();
        g.n = 100;
        drop(g);
        // Refused conditional writes: nothing changes.
        let e = s.store_context_if(id, v - 1, job(101)).await.unwrap_err();
        assert!(e.is_conflict(), "{e:?}");
        let e = s.store_context_if(id, 0, job(102)).await.unwrap_err();
        assert!(e.is_conflict(), "{e:?}");
        let e = s.delete_context_if::<Job>(id, v + 1000).await.unwrap_err();
        assert!(e.is_conflict(), "{e:?}");
        // A transaction that writes the row by hand and rolls back.
        let c = client().await;
        c.batch_execute(&format!(
            "BEGIN; UPDATE {table} SET version = version + 1000000 WHERE id = '{id}'; \
             SELECT pg_notify('ctxstore.{table}', '{id} {}'); ROLLBACK",
            Job::kind()
        ))
        .await
        .unwrap();
        assert!(stays_quiet(&mut w, 700).await);
        // A real commit after all that is seen, exactly.
        let v2 = s.update_context(id, |j: &mut Job| {
            j.n += 1;
        });
        v2.await.unwrap();
        let snap = next(&mut w).await.unwrap();
        let now = s.get_context_snapshot::<Job>(id).await.unwrap();
        assert_eq!((snap.n, snap.version()), (3, now.version()));
        assert!(snap.version() > v);
        // A spurious notification (no commit) does not make it return.
        c.batch_execute(&format!(
            "SELECT pg_notify('ctxstore.{table}', '{id} {}')",
            Job::kind()
        ))
        .await
        .unwrap();
        assert!(stays_quiet(&mut w, 500).await);
    })
    .await
}

/// The pid of the store's listening session (by its application name).
async fn listener_pid(c: &tokio_postgres::Client, table: &str) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        &[&format!("ctxstore:{table}:listen")],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_recovers_when_its_listening_connection_is_killed() {
    guarded(async {
        let table = fresh_table();
        let s = store_on(&table).await;
        let writer = store_on(&table).await;
        let c = client().await;
        // No watch yet: no listening connection (stores that never watch pay
        // nothing).
        assert_eq!(listener_pid(&c, &table).await, None);
        let id = Uuid::new_v4();
        writer.store_context(id, job(1)).await.unwrap();
        let mut w = s.watch_context::<Job>(id).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().n, 1);
        let pid = listener_pid(&c, &table).await.expect("a listening session");

        // Kill it, wait until it is gone, and commit at once: the commit
        // most likely lands while nobody listens (the listener waits
        // 100 ms before reconnecting).
        let killed: bool = c
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap()
            .get(0);
        assert!(killed);
        while c
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let v2 = writer.store_context(id, job(2)).await.unwrap();
        let relistened = listener_pid(&c, &table).await;
        eprintln!(
            "committed v{v2}; listening again already: {}",
            relistened.is_some()
        );

        // Backend errors (naming the key) until the listener is back, then
        // the newest version: the commit made meanwhile is not lost.
        let mut errors = 0;
        let snap = loop {
            match next(&mut w).await {
                Ok(snap) => break snap,
                Err(e) => {
                    assert!(e.is_backend(), "{e:?}");
                    assert_eq!(e.id(), Some(id));
                    eprintln!("during the outage: {e}");
                    errors += 1;
                    assert!(errors < 100, "no recovery");
                }
            }
        };
        assert_eq!((snap.n, snap.version()), (2, v2));

        // Listening again, on a new session; later commits are seen too.
        let new_pid = loop {
            match listener_pid(&c, &table).await {
                Some(p) if p != pid => break p,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        assert_ne!(new_pid, pid);
        let v3 = writer.store_context(id, job(3)).await.unwrap();
        let snap = loop {
            match next(&mut w).await {
                Ok(snap) => break snap,
                Err(e) => {
                    assert!(e.is_backend(), "{e:?}");
                    errors += 1;
                    assert!(errors < 100, "no recovery");
                }
            }
        };
        assert_eq!((snap.n, snap.version()), (3, v3));
        // The key is registered by the new session only: the old
        // session's row was purged when the new one set up.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while registered(&c, &table, id).await != vec![new_pid] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "registry not moved over"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The outage was reported (once per failure, to every watch).
        assert!(errors >= 1, "the lost connection was never reported");
        // A watch begun after the outage reports nothing of it.
        let mut w2 = s.watch_context::<Job>(id).await.unwrap();
        assert_eq!(next(&mut w2).await.unwrap().version(), v3);
        let v4 = writer.store_context(id, job(4)).await.unwrap();
        assert_eq!(next(&mut w2).await.unwrap().version(), v4);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_works_on_a_schema_1_table_after_the_migration() {
    guarded(async {
        // A table of the previous release (schema 1: no `created` column),
        // with a row.
        let table = fresh_table();
        let c = client().await;
        let id = Uuid::new_v4();
        c.batch_execute(&format!(
            "CREATE TABLE {table} (kind text NOT NULL, id uuid NOT NULL, version bigint NOT NULL, \
             value jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), \
             PRIMARY KEY (kind, id)); \
             CREATE SEQUENCE {table}_version_seq AS bigint MINVALUE 1 CACHE 1; \
             SELECT setval('{table}_version_seq', 10); \
             COMMENT ON TABLE {table} IS 'ctxstore contexts, schema 1'"
        ))
        .await
        .unwrap();
        c.execute(
            &format!(
                "INSERT INTO {table} VALUES ($1, $2, 5, '{{\"name\":\"old\",\"n\":9}}', now())"
            ),
            &[&Job::kind(), &id],
        )
        .await
        .unwrap();
        // Connecting migrates it (idempotently: twice is fine).
        let s = store_on(&table).await;
        let again = store_on(&table).await;
        let comment: String = c
            .query_one(
                &format!("SELECT obj_description('{table}'::regclass, 'pg_class')"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(comment, "ctxstore contexts, schema 3");
        // The old row (no creation stamp) is watched...
        let mut w = s.watch_context::<Job>(id).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().version(), 5);
        let v = again.update_context(id, |j: &mut Job| j.n += 1);
        v.await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().n, 10);
        // ...and its re-creation, stamped, is not followed.
        again.delete_context::<Job>(id).await.unwrap();
        again.store_context(id, job(1)).await.unwrap();
        assert!(next(&mut w).await.unwrap_err().is_not_found());
        // An insert by an older release (not naming the column) is stamped
        // by the column default.
        let old = Uuid::new_v4();
        c.execute(
            &format!(
                "INSERT INTO {table} (kind, id, version, value) \
                 VALUES ($1, $2, nextval('{table}_version_seq'), '{{\"name\":\"x\",\"n\":0}}')"
            ),
            &[&Job::kind(), &old],
        )
        .await
        .unwrap();
        let stamped: Option<i64> = c
            .query_one(
                &format!("SELECT created FROM {table} WHERE id = $1"),
                &[&old],
            )
            .await
            .unwrap()
            .get(0);
        assert!(stamped.is_some());
    })
    .await
}

// ---------------------------------------------------------------------
// The watch registry: writers notify only for watched keys.
// ---------------------------------------------------------------------

/// A raw connection that `LISTEN`s on the table's channel; the payloads
/// of its notifications arrive on the returned channel.
async fn raw_listener(
    table: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"ctxstore.{table}\""))
        .await
        .unwrap();
    (client, rx)
}

/// The notifications that arrive within `ms`.
async fn arriving(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, ms: u64) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        got.push(p);
    }
    got
}

/// The pids registered for `id` in the table's watch registry.
async fn registered(c: &tokio_postgres::Client, table: &str, id: Uuid) -> Vec<i32> {
    c.query(
        &format!("SELECT pid FROM {table}_watch WHERE kind = $1 AND id = $2 ORDER BY pid"),
        &[&Job::kind(), &id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_registry_writers_notify_only_for_watched_keys() {
    guarded(async {
        let table = fresh_table();
        let s = store_on(&table).await;
        let writer = store_on(&table).await;
        let c = client().await;
        let (_listening, mut rx) = raw_listener(&table).await;
        let (watched, unwatched) = (Uuid::new_v4(), Uuid::new_v4());
        writer.store_context(watched, job(1)).await.unwrap();
        let v = writer.store_context(unwatched, job(1)).await.unwrap();
        // Nobody watches yet: no writer notified.
        assert_eq!(arriving(&mut rx, 300).await, Vec::<String>::new());

        let mut w = s.watch_context::<Job>(watched).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().n, 1);
        let pid = listener_pid(&c, &table).await.expect("a listening session");
        assert_eq!(registered(&c, &table, watched).await, vec![pid]);
        assert_eq!(registered(&c, &table, unwatched).await, Vec::<i32>::new());

        // Every kind of write on the unwatched key: nothing arrives.
        let v = writer.store_context_if(unwatched, v, job(2)).await.unwrap();
        writer
            .update_context(unwatched, |j: &mut Job| j.n += 1)
            .await
            .unwrap();
        writer.store_context(unwatched, job(4)).await.unwrap();
        let e = writer.store_context_if(unwatched, v, job(5)).await;
        assert!(e.unwrap_err().is_conflict());
        writer.delete_context::<Job>(unwatched).await.unwrap();
        writer.store_context_if(unwatched, 0, job(6)).await.unwrap();
        assert_eq!(arriving(&mut rx, 300).await, Vec::<String>::new());

        // A write on the watched key arrives, once per commit.
        let payload = format!("{watched} {}", Job::kind());
        let v = writer.store_context(watched, job(2)).await.unwrap();
        assert_eq!(arriving(&mut rx, 300).await, vec![payload.clone()]);
        assert_eq!(next(&mut w).await.unwrap().version(), v);
        // A refused conditional write on it sends nothing.
        let e = writer.store_context_if(watched, v + 1, job(3)).await;
        assert!(e.unwrap_err().is_conflict());
        let e = writer.delete_context_if::<Job>(watched, v + 1).await;
        assert!(e.unwrap_err().is_conflict());
        assert_eq!(arriving(&mut rx, 300).await, Vec::<String>::new());
        // A guard's commit, a conditional write, a delete: one each.
        writer
            .update_context(watched, |j: &mut Job| j.n += 1)
            .await
            .unwrap();
        let v = writer.get_context_snapshot::<Job>(watched).await.unwrap();
        writer
            .store_context_if(watched, v.version(), job(9))
            .await
            .unwrap();
        assert_eq!(arriving(&mut rx, 300).await, vec![payload.clone(); 2]);

        // A second watch of the key in this store shares the row; the
        // last one gone deletes it, and writers stop notifying.
        let mut w2 = s.watch_context::<Job>(watched).await.unwrap();
        assert_eq!(next(&mut w2).await.unwrap().n, 9);
        assert_eq!(registered(&c, &table, watched).await, vec![pid]);
        drop(w);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(registered(&c, &table, watched).await, vec![pid]);
        drop(w2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !registered(&c, &table, watched).await.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "row not deleted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        writer.store_context(watched, job(10)).await.unwrap();
        writer.delete_context::<Job>(watched).await.unwrap();
        assert_eq!(arriving(&mut rx, 300).await, Vec::<String>::new());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_registry_rows_of_dead_sessions_are_purged_when_a_listener_starts() {
    guarded(async {
        let table = fresh_table();
        let s = store_on(&table).await;
        let c = client().await;
        // A session that registered a key and died without cleaning up.
        let dead: i32 = {
            let gone = client().await;
            let pid = gone
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            drop(gone);
            pid
        };
        while c
            .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&dead])
            .await
            .unwrap()
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let alive: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let (stale, other) = (Uuid::new_v4(), Uuid::new_v4());
        for (id, pid) in [(stale, dead), (other, alive)] {
            c.execute(
                &format!("INSERT INTO {table}_watch (kind, id, pid) VALUES ($1, $2, $3)"),
                &[&Job::kind(), &id, &pid],
            )
            .await
            .unwrap();
        }
        // Until then, the stale row makes writers of its key notify.
        let (_listening, mut rx) = raw_listener(&table).await;
        s.store_context(stale, job(1)).await.unwrap();
        assert_eq!(arriving(&mut rx, 300).await.len(), 1);

        // A listener starts (the store's first watch): the dead session's
        // row is gone, a live session's row stays.
        let id = Uuid::new_v4();
        s.store_context(id, job(1)).await.unwrap();
        let _w = s.watch_context::<Job>(id).await.unwrap();
        assert_eq!(registered(&c, &table, stale).await, Vec::<i32>::new());
        assert_eq!(registered(&c, &table, other).await, vec![alive]);
        let pid = listener_pid(&c, &table).await.expect("a listening session");
        assert_eq!(registered(&c, &table, id).await, vec![pid]);
        s.store_context(stale, job(2)).await.unwrap();
        assert_eq!(arriving(&mut rx, 300).await, Vec::<String>::new());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_started_while_a_writer_holds_the_row_sees_its_commit() {
    guarded(async {
        let table = fresh_table();
        let s = store_on(&table).await;
        let id = Uuid::new_v4();
        let v1 = s.store_context(id, job(1)).await.unwrap();
        // A writer of another process that wrote the row and ran its
        // notify statement before the watch registered (so it found no
        // registry row and will not notify), and has not committed yet:
        // the race the locking read closes.
        let c = client().await;
        c.batch_execute(&format!(
            "BEGIN; \
             UPDATE {table} SET value = '{{\"name\":\"j\",\"n\":2}}', \
                 version = nextval('{table}_version_seq') \
                 WHERE kind = '{kind}' AND id = '{id}'; \
             SELECT set_config('ctxstore.wrote', 'on', true); \
             SELECT pg_notify('ctxstore.{table}', '{id} {kind}') FROM {table}_watch \
                 WHERE kind = '{kind}' AND id = '{id}' \
                 AND current_setting('ctxstore.wrote', true) = 'on' LIMIT 1;",
            kind = Job::kind()
        ))
        .await
        .unwrap();
        // The watch does not wait for the holder: it starts with the
        // committed version...
        let (w, took) = elapsed("watch", 10, s.watch_context::<Job>(id)).await;
        let mut w = w.unwrap();
        eprintln!("watch started in {took:?} while the row was held");
        let first = next(&mut w).await.unwrap();
        assert_eq!((first.n, first.version()), (1, v1));
        // ...and its next changed() waits for the holder's commit, which
        // sends no notification, and reports it.
        let waiting = tokio::spawn(async move {
            let snap = next(&mut w).await;
            (w, snap)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished());
        c.batch_execute("COMMIT").await.unwrap();
        let (mut w, snap) = waiting.await.unwrap();
        let snap = snap.unwrap();
        let now = s.get_context_snapshot::<Job>(id).await.unwrap();
        assert_eq!((snap.n, snap.version()), (2, now.version()));
        // Later commits notify (the key is registered now).
        let v = s.store_context(id, job(3)).await.unwrap();
        assert_eq!(next(&mut w).await.unwrap().version(), v);

        // A guard of this store held while a watch starts: the watch does
        // not wait for it, and sees its commit.
        let mut g = s.get_context::<Job>(id).await.unwrap();
        let (w2, took) = elapsed("watch", 10, s.watch_context::<Job>(id)).await;
        let mut w2 = w2.unwrap();
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(next(&mut w2).await.unwrap().version(), v);
        g.n = 4;
        let v = g.commit().await.unwrap();
        let snap = next(&mut w2).await.unwrap();
        assert_eq!((snap.n, snap.version()), (4, v));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_registration_racing_writers_loses_no_commit() {
    guarded(async {
        // Every round a new key, so every watch start registers it, while
        // another "process" commits one write (a store, a guard, a
        // conditional store) at a varying moment around it; the watch must
        // then reach that write's version without any further write.
        let table = fresh_table();
        let s = store_on(&table).await;
        let other = store_on(&table).await;
        // The listener is up before the rounds (its start is not the race).
        let warm = Uuid::new_v4();
        s.store_context(warm, job(0)).await.unwrap();
        let _warm = s.watch_context::<Job>(warm).await.unwrap();
        for round in 0..60u64 {
            let id = Uuid::new_v4();
            other.store_context(id, job(0)).await.unwrap();
            let writer = other.clone();
            let write = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(250 * (round % 12))).await;
                match round % 3 {
                    0 => writer.store_context(id, job(1)).await.map(drop),
                    1 => writer
                        .update_context(id, |j: &mut Job| j.n = 1)
                        .await
                        .map(drop),
                    _ => {
                        let snap = writer.get_context_snapshot::<Job>(id).await.unwrap();
                        writer
                            .store_context_if(id, snap.version(), job(1))
                            .await
                            .map(drop)
                    }
                }
                .unwrap();
            });
            let mut w = s.watch_context::<Job>(id).await.unwrap();
            write.await.unwrap();
            let last = other.get_context_snapshot::<Job>(id).await.unwrap();
            let mut seen = next(&mut w).await.unwrap();
            while seen.version() < last.version() {
                seen = next(&mut w).await.unwrap();
            }
            assert_eq!(
                (seen.n, seen.version()),
                (1, last.version()),
                "round {round}"
            );
        }
    })
    .await
}
