package cli

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/vmgrid/vmgrid/dataserver/dataclient"
	datav1 "github.com/vmgrid/vmgrid/proto/vmgrid/data/v1"
)

// dataFlags name the data server and the owner the data verbs act as.
type dataFlags struct {
	service
	owner string
	quiet bool
}

// verb is a data verb's RunE with a client of the data server acting on
// --owner's files.
func (f *dataFlags) verb(g *globals, fn verbFunc[*dataclient.Client]) func(*cobra.Command, []string) error {
	return withClient(g, &f.service, func(cc grpc.ClientConnInterface) *dataclient.Client {
		cl := dataclient.NewClient(cc)
		cl.Owner = f.owner
		return cl
	}, fn)
}

func dataCmd(g *globals) *cobra.Command {
	f := &dataFlags{}
	c := group(&cobra.Command{
		Use:   "data",
		Short: "Upload, download, list and delete your files on a data server",
		Long: `Upload, download, list and delete your files on a data server.

Every file belongs to the owner of the token (--token, env VMGRID_TOKEN);
remote paths are relative, e.g. in/video.mp4. With --owner you read files
another owner shared with you (vmgrid data grant).`,
	}, dataPutCmd(g, f), dataGetCmd(g, f), dataListCmd(g, f), dataStatCmd(g, f), dataRmCmd(g, f),
		dataGrantCmd(g, f, "grant", "Let another owner read your files under PREFIX (whole path components; default: all)"),
		dataGrantCmd(g, f, "revoke", "Take back a grant"), dataGrantsCmd(g, f))
	pf := c.PersistentFlags()
	f.addrFlag(pf, "server", "VMGRID_DATASERVER", "127.0.0.1:7090", "data server", func(cx *clientContext) []string { return []string{cx.DataServer} })
	f.tokenFlag(pf, "no token: pass --token or set VMGRID_TOKEN")
	pf.StringVar(&f.owner, "owner", "", "read another owner's shared files (get, ls, stat)")
	return c
}

func dataPutCmd(g *globals, f *dataFlags) *cobra.Command {
	c := &cobra.Command{
		Use:   "put LOCAL REMOTE",
		Short: "Upload a file (visible only once complete and verified); LOCAL - reads stdin",
		Example: `  vmgrid data put ./video.mp4 in/video.mp4
  vmgrid data put ./video.mp4 in/          # REMOTE ending in / keeps the name
  tar c dir | vmgrid data put - in/dir.tar`,
		Args: cobra.ExactArgs(2),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *dataclient.Client) error {
			local, remote := args[0], args[1]
			if strings.HasSuffix(remote, "/") {
				if local == "-" {
					return errors.New("REMOTE must name the file when reading stdin")
				}
				remote += filepath.Base(local)
			}
			var info *datav1.FileInfo
			took, err := transfer(cmd, f.quiet, "uploading "+remote, func(update func(done, total uint64)) (err error) {
				if local == "-" {
					info, err = cl.UploadReader(cmd.Context(), os.Stdin, -1, remote, update)
				} else {
					info, err = cl.Upload(cmd.Context(), local, remote, update)
				}
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "stored %s: %s in %s\n", info.Path, humanBytes(info.Size), took)
			return nil
		}),
	}
	c.Flags().BoolVarP(&f.quiet, "quiet", "q", false, "no progress bar")
	return c
}

func dataGetCmd(g *globals, f *dataFlags) *cobra.Command {
	c := &cobra.Command{
		Use:   "get REMOTE [LOCAL]",
		Short: "Download a file, resuming an interrupted download; LOCAL - writes stdout",
		Long: `Download a file to LOCAL (default: its name in the current directory; into
LOCAL when it is a directory). Data goes to LOCAL.partial first and is renamed
into place once its SHA-256 matches; running the same command again after an
interruption resumes from LOCAL.partial.`,
		Args: cobra.RangeArgs(1, 2),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *dataclient.Client) error {
			remote := args[0]
			local := path.Base(remote)
			if len(args) == 2 {
				local = args[1]
			}
			if local == "-" {
				_, err := cl.ReadRange(cmd.Context(), remote, 0, 0, cmd.OutOrStdout())
				return err
			}
			if st, err := os.Stat(local); err == nil && st.IsDir() {
				local = filepath.Join(local, path.Base(remote))
			}
			var info *datav1.FileInfo
			took, err := transfer(cmd, f.quiet, "downloading "+remote, func(update func(done, total uint64)) (err error) {
				info, err = cl.Download(cmd.Context(), remote, local, update)
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "saved %s: %s in %s, sha256 verified\n", local, humanBytes(info.Size), took)
			return nil
		}),
	}
	c.Flags().BoolVarP(&f.quiet, "quiet", "q", false, "no progress bar")
	return c
}

// fileColumns are the table of data ls and data stat.
var fileColumns = []column[*datav1.FileInfo]{
	{name: "SIZE", value: func(fi *datav1.FileInfo) string { return humanBytes(fi.Size) }},
	{name: "MODIFIED", value: func(fi *datav1.FileInfo) string { return time.Unix(0, fi.ModifiedUnixNano).Format(time.DateTime) }},
	{name: "SHA256", value: func(fi *datav1.FileInfo) string { return hex.EncodeToString(fi.Sha256)[:min(12, 2*len(fi.Sha256))] }},
	{name: "PATH", value: func(fi *datav1.FileInfo) string { return fi.Path }},
	{name: "OWNER", wide: true, value: func(fi *datav1.FileInfo) string { return fi.Owner }},
	{name: "BYTES", wide: true, value: func(fi *datav1.FileInfo) string { return fmt.Sprint(fi.Size) }},
}

func dataListCmd(g *globals, f *dataFlags) *cobra.Command {
	var o output
	c := &cobra.Command{
		Use:     "ls [PREFIX]",
		Aliases: []string{"list"},
		Short:   "List files whose path starts with PREFIX",
		Args:    cobra.MaximumNArgs(1),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *dataclient.Client) error {
			prefix := ""
			if len(args) == 1 {
				prefix = args[0]
			}
			files, err := cl.List(cmd.Context(), prefix)
			if err != nil {
				return err
			}
			return printItems(cmd.OutOrStdout(), &o, &datav1.ListResponse{Files: files}, files, fileColumns)
		}),
	}
	o.register(c)
	return c
}

func dataStatCmd(g *globals, f *dataFlags) *cobra.Command {
	var o output
	c := &cobra.Command{
		Use:     "stat REMOTE",
		Aliases: []string{"show"},
		Short:   "Show a file's owner, size, time and SHA-256",
		Args:    cobra.ExactArgs(1),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *dataclient.Client) error {
			return show(cmd, &o, fileColumns)(cl.Stat(cmd.Context(), args[0]))
		}),
	}
	o.register(c)
	return c
}

func dataRmCmd(g *globals, f *dataFlags) *cobra.Command {
	return &cobra.Command{
		Use:     "rm REMOTE...",
		Aliases: []string{"delete"},
		Short:   "Delete files",
		Args:    cobra.MinimumNArgs(1),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *dataclient.Client) error {
			return each(cmd, args, "deleted", func(p string) error { return cl.Delete(cmd.Context(), p) })
		}),
	}
}

// dataGrantCmd is grant and revoke: the same arguments, the opposite call.
func dataGrantCmd(g *globals, f *dataFlags, verb, short string) *cobra.Command {
	return &cobra.Command{
		Use:   verb + " OWNER [PREFIX]",
		Short: short,
		Args:  cobra.RangeArgs(1, 2),
		RunE: f.verb(g, func(cmd *cobra.Command, args []string, cl *dataclient.Client) error {
			prefix := ""
			if len(args) == 2 {
				prefix = args[1]
			}
			if verb == "revoke" {
				if err := cl.Revoke(cmd.Context(), args[0], prefix); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "revoked %s on %q\n", args[0], prefix)
				return nil
			}
			if err := cl.Grant(cmd.Context(), args[0], prefix); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s may read %q\n", args[0], prefix)
			return nil
		}),
	}
}

var grantColumns = []column[*datav1.ReadGrant]{
	{name: "OWNER", value: func(gr *datav1.ReadGrant) string { return gr.Owner }},
	{name: "GRANTEE", value: func(gr *datav1.ReadGrant) string { return gr.Grantee }},
	{name: "PREFIX", value: func(gr *datav1.ReadGrant) string { return strconv.Quote(gr.Prefix) }},
}

func dataGrantsCmd(g *globals, f *dataFlags) *cobra.Command {
	var o output
	c := &cobra.Command{
		Use:   "grants",
		Short: "List the grants you gave and received",
		Args:  cobra.NoArgs,
		RunE: f.verb(g, func(cmd *cobra.Command, _ []string, cl *dataclient.Client) error {
			given, received, err := cl.Grants(cmd.Context())
			if err != nil {
				return err
			}
			resp := &datav1.ListGrantsResponse{Given: given, Received: received}
			return printItems(cmd.OutOrStdout(), &o, resp, append(given, received...), grantColumns)
		}),
	}
	o.register(c)
	return c
}
