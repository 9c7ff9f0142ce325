"""``kvzip_former``: mixkv's KVzip setup before issue 30 (``mixkv.methods.kvzip.FORMER``: no
chat header, the same prompt for every chunk, the whole prefill re-read, no kept prefix, the
model's softmax over every key), registered for ``mixkv-eval --import`` so that it runs beside
the official setup (``kvzip``) under every policy."""

from mixkv.methods import KVzip, kvzip, register_scorer


@register_scorer("kvzip_former")
class KVzipFormer(KVzip):
    def __init__(self, tokenizer=None):
        super().__init__(tokenizer=tokenizer, **kvzip.FORMER)
