"""Where the shipped default model lives: `marserve generate` / `serve` use MODEL_DIR when no model is named."""

import os

MODEL_DIR = os.path.dirname(os.path.abspath(__file__))
