import sys

from tailor_ui.cli import main

sys.exit(main())
