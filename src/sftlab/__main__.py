import sys

from .allocator import reexec_under_jemalloc

reexec_under_jemalloc(sys.argv[1:])  # before anything heavy is imported: the process may be replaced here

from .cli import main  # noqa: E402

sys.exit(main())
