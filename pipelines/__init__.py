from .story import StoryOutput, StoryPipeline, comic_strip  # noqa: F401  (issue 6)
from .default_model import DEFAULT_MODEL_DIR, load_default  # noqa: F401  (issue 9)
