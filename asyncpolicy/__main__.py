import sys

from asyncpolicy.cli import main

sys.exit(main())
