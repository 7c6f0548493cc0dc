module github.com/m2mguard/m2mguard

go 1.26
