"""`python -m visattn.demos`: same as the `visattn-demo` console script."""
import sys

from .app import main

sys.exit(main())
