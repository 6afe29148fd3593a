import sys
from pathlib import Path

# Test helpers such as objective_reference live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
