import os
import sys

# tests/gpu reuses the CPU suite's sample inputs
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
