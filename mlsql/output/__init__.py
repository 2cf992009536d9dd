"""What a statement returns and how it is shown: the result, its number formats, charts and pager."""
