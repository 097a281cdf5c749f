use ctxstore::{Context, ContextStorage, ContextStorageExt, InMemoryContextStorage, Uuid};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Job {
    name: String,
    n: u64,
}
impl Context for Job {}

#[tokio::test]
async fn basic_flow() {
    let s = InMemoryContextStorage::new();
    let id = Uuid::new_v4();
    let v0 = s.store_context(id, Job { name: "a".into(), n: 0 }).await.unwrap();
    let mut g = s.get_context::<Job>(id).await.unwrap();
    g.n += 1;
    let v1 = g.commit().await.unwrap();
    assert!(v1 > v0);
    let snap = s.snapshot::<Job>(id).unwrap();
    assert_eq!((snap.n, snap.version()), (1, v1));
    let dyn_s: Arc<dyn ContextStorage> = Arc::new(InMemoryContextStorage::new());
    dyn_s.store_context(id, Job { name: "b".into(), n: 5 }).await.unwrap();
    dyn_s.update_context(id, |j: &mut Job| j.n += 1).await.unwrap();
    assert_eq!(dyn_s.get_context_snapshot::<Job>(id).await.unwrap().n, 6);
    let e = s.delete_context::<Job>(Uuid::nil()).await.unwrap_err();
    assert_eq!(e.to_string(), format!("no Job context known for {}", Uuid::nil()));
}
