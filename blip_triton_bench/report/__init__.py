"""The report: tables and lines (text), plots (plots), and the files they go into (write)."""
