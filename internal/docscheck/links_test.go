package docscheck

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// root is the repository root, seen from this package.
const root = "../.."

// documents are the Markdown files whose links must resolve.
func documents(t *testing.T) []string {
	t.Helper()
	docs := []string{"README.md", "SECURITY.md", "BENCHMARKS.md"}
	more, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range more {
		rel, _ := filepath.Rel(root, m)
		docs = append(docs, rel)
	}
	return docs
}

// link matches an inline Markdown link or image target: ](target).
var link = regexp.MustCompile(`\]\(([^)\s]+)\)`)

// heading turns a Markdown heading into the anchor GitHub gives it.
func anchor(h string) string {
	h = strings.ToLower(strings.TrimSpace(strings.TrimLeft(h, "#")))
	var b strings.Builder
	for _, r := range h {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r > 127:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func anchors(t *testing.T, file string) map[string]bool {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "#") {
			out[anchor(line)] = true
		}
	}
	return out
}

// TestLinksResolve: every relative link of the documents names a file of
// the repository (and, with a #fragment into a Markdown file, one of its
// headings); none leaves the repository.
func TestLinksResolve(t *testing.T) {
	abs, err := filepath.Abs(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, doc := range documents(t) {
		data, err := os.ReadFile(filepath.Join(root, doc))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range link.FindAllStringSubmatch(string(data), -1) {
			target := m[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			path, frag, _ := strings.Cut(target, "#")
			file := filepath.Join(root, doc)
			if path != "" {
				file = filepath.Join(root, filepath.Dir(doc), path)
			}
			fa, _ := filepath.Abs(file)
			if !strings.HasPrefix(fa, abs+string(filepath.Separator)) && fa != abs {
				t.Errorf("%s: link %q leaves the repository", doc, target)
				continue
			}
			if _, err := os.Stat(file); err != nil {
				t.Errorf("%s: link %q: %v", doc, target, err)
				continue
			}
			if frag != "" && strings.HasSuffix(file, ".md") && !anchors(t, file)[frag] {
				t.Errorf("%s: link %q: no heading #%s in %s", doc, target, frag, path)
			}
		}
	}
}

// TestNothingOutsideTheRepository: no tracked text names the folder beside
// the repository that the spec once came from.
func TestNothingOutsideTheRepository(t *testing.T) {
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case ".git", ".bin", "bin", "data", "testdata", "node_modules":
				return filepath.SkipDir
			}
			return nil
		}
		switch filepath.Ext(p) {
		case ".go", ".md", ".yml", ".yaml", ".sh", ".hcl", "":
		default:
			return nil
		}
		info, err := d.Info()
		if err != nil || info.Size() > 1<<20 {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if strings.Contains(string(data), "../"+"shared") {
			t.Errorf("%s names ../%s", p, "shared")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
