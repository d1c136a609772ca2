"""Models through open_clip: loading, prompts, text heads and scoring. Nothing here knows about Ray."""
