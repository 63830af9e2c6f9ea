from .cli import entry  # (cli's own imports are light: the jemalloc re-exec still comes before torch)

entry()
