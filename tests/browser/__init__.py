"""The dashboard in a real browser (headless Chromium from Debian's packages)."""
