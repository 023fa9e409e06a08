"""Direct I/O alignment: offsets, lengths and buffer addresses in multiples of ALIGN bytes."""

ALIGN = 4096


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def align_down(n: int, align: int = ALIGN) -> int:
    return n // align * align
