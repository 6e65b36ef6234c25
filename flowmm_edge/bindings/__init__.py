"""Bindings to the patched llama.cpp: loading it (native), model and context handles
(runtime), the KV cache extension (kv_cache), attention statistics (attention_stats), the
vision projector (multimodal), llama.cpp's sampler chain (sampling), and turning text and
images into decodable pieces (prompt, images), and reading the image files and URLs a user or
client names, bounded (media)."""
