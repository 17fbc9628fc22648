import os
import sys

# tests import their helpers (oracle, common) as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
