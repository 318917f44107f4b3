"""What several test folders share: real processes (`processes`), services to test against (`services`),
tiny problems and files to distil (`data`), and requests to the API (`api`). A fixture stays in its folder's
conftest.py, built from these; a helper only one file uses stays in that file."""
