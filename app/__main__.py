import sys

from app.run import main

sys.exit(main())
