"""Reports: terminal tables, JSON, Markdown and self-contained HTML."""
