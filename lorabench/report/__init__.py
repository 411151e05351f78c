"""Report folders: results.json/csv, report.md and report.html with figures."""
