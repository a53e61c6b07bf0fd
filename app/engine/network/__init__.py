"""The network on the device: model, packed linears, attention backends, KV pool, model runner."""
