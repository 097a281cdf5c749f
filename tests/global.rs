//! The process-wide default storage. Its own test binary (own process), so
//! the first use below really is the first.

use std::sync::{Arc, Barrier};

use ctxstore::{
    context_storage, set_context_storage, with_context_storage_blocking, ContextStorage,
    InMemoryContextStorage,
};

#[test]
fn the_default_is_one_instance_even_when_threads_race_on_first_use() {
    // wepositive-di 0.2.0: two threads racing on first use could get two stores.
    let barrier = Arc::new(Barrier::new(16));
    let stores: Vec<Arc<dyn ContextStorage>> = (0..16)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                context_storage()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for s in &stores {
        assert!(Arc::ptr_eq(s, &stores[0]));
        assert_eq!(s.backend_name(), "memory");
    }
    assert!(Arc::ptr_eq(&context_storage(), &stores[0]));

    // A scoped override is seen inside the scope only.
    let scoped: Arc<dyn ContextStorage> = Arc::new(InMemoryContextStorage::new());
    let inside = with_context_storage_blocking(scoped.clone(), context_storage);
    assert!(Arc::ptr_eq(&inside, &scoped));
    assert!(Arc::ptr_eq(&context_storage(), &stores[0]));

    // Installing another storage swaps the process-wide one.
    let installed: Arc<dyn ContextStorage> = Arc::new(InMemoryContextStorage::new());
    let previous = set_context_storage(installed.clone());
    assert!(Arc::ptr_eq(&previous, &stores[0]));
    assert!(Arc::ptr_eq(&context_storage(), &installed));
}
