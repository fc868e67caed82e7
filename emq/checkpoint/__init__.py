"""Checkpoints emq makes once and caches: merged models (merge: stream and peft methods), built on the
streaming safetensors I/O (safetensors_io), content identities (identity) and the cache (lock, atomic
publish, manifest). A producer hands `cache.get_or_build` a key, its inputs and a function that writes
into a temp dir; nothing here imports torch until a kernel needs it.
"""
