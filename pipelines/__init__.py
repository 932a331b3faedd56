from .story import StoryOutput, StoryPipeline, comic_strip  # noqa: F401  (issue 6)
