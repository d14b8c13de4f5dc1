"""Container images: the pure model (digest, reference, model, layer, mutate), the store, safe
flattening, and the adapters that move images (registry, engine, transfer, resolve)."""
