"""Files in and out: loading and saving models, checked input folders, atomic writes, output folders."""
