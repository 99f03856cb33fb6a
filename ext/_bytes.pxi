# Byte values the compiled HTTP scanners name (shared by ``include``).

cdef enum:
    LF = 0x0A
    CR = 0x0D
    SP = 0x20
    HTAB = 0x09
    COLON = 0x3A
    COMMA = 0x2C
    SEMI = 0x3B
    SLASH = 0x2F
    QMARK = 0x3F
    HASH = 0x23
    BACKSLASH = 0x5C
