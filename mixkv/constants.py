"""The method vocabulary's two constants, written once: the default observation window
(``torch.ops.mixkv``'s schema defaults say the same, in C++) and the name of "no compression"."""

DEFAULT_WINDOW = 32   # tokens of the observation window, always kept (window queries score)
FULL = "full"         # the method name of the full cache: nothing compressed
