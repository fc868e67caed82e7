"""What people read: console tables (the plan, the end-of-run summary) and the sweep report
(summary.csv / summary.md / report.html with plots)."""
