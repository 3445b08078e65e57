"""Size limits more than one module applies (a module of constants: importing it loads no library)."""

# The default cap on one message of a gRPC plane Pollinate runs itself: the split service and its clients.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
