import sys

from quantization.cli import main

sys.exit(main())
