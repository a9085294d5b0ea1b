// A JDBC client as DBeaver and other Java tools use one (PostgreSQL's pgjdbc driver, Debian's
// libpostgresql-jdbc-java), against atlake's Postgres port. Prints what it read, one fact a
// line, for tests/it/jdbc.rs to check.
//
//   java -cp /usr/share/java/postgresql.jar JdbcProbe.java jdbc:postgresql://127.0.0.1:5432/atlake TOKEN
import java.sql.*;

public class JdbcProbe {
    public static void main(String[] args) throws Exception {
        java.util.Properties p = new java.util.Properties();
        p.setProperty("user", "dbeaver");
        p.setProperty("password", args.length > 1 ? args[1] : "");
        p.setProperty("ApplicationName", "JdbcProbe");
        try (Connection c = DriverManager.getConnection(args[0], p)) {
            DatabaseMetaData md = c.getMetaData();
            System.out.println("product\t" + md.getDatabaseProductName() + " " + md.getDatabaseProductVersion());
            try (ResultSet rs = md.getSchemas()) {
                while (rs.next()) System.out.println("schema\t" + rs.getString("TABLE_SCHEM"));
            }
            try (ResultSet rs = md.getTables(null, "public", "%", new String[] {"TABLE", "VIEW"})) {
                while (rs.next()) System.out.println("table\t" + rs.getString("TABLE_SCHEM") + "." + rs.getString("TABLE_NAME") + "\t" + rs.getString("TABLE_TYPE"));
            }
            try (ResultSet rs = md.getColumns(null, "public", "posts", "%")) {
                while (rs.next()) System.out.println("column\tposts." + rs.getString("COLUMN_NAME") + "\t" + rs.getString("TYPE_NAME"));
            }
            // what DBeaver's navigator sends after connecting (as recorded in a public note of
            // the queries its UI runs): the current schema and user, the schemas with their
            // descriptions, one schema by name (a parameter), the roles
            String[] navigator = {
                "SELECT current_schema(),session_user",
                "SELECT n.oid,n.*,d.description FROM pg_catalog.pg_namespace n LEFT OUTER JOIN pg_catalog.pg_description d ON d.objoid=n.oid AND d.objsubid=0 AND d.classoid='pg_namespace'::regclass ORDER BY nspname",
                "SELECT n.oid,n.*,d.description FROM pg_catalog.pg_namespace n LEFT OUTER JOIN pg_catalog.pg_description d ON d.objoid=n.oid AND d.objsubid=0 AND d.classoid='pg_namespace'::regclass WHERE nspname=? ORDER BY nspname",
                "SELECT a.oid,a.* FROM pg_catalog.pg_roles a ORDER BY a.rolname",
            };
            for (int i = 0; i < navigator.length; i++) {
                try (PreparedStatement ps = c.prepareStatement(navigator[i])) {
                    if (navigator[i].contains("?")) ps.setString(1, "public");
                    int rows = 0;
                    String first = "";
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) {
                            if (rows++ == 0) first = i == 0 ? rs.getString(1) : i == 3 ? rs.getString("rolname") : rs.getString("nspname");
                        }
                    }
                    System.out.println("navigator\t" + i + "\tok\t" + rows + "\t" + first);
                } catch (SQLException e) {
                    System.out.println("navigator\t" + i + "\tfailed\t" + e.getMessage().replace('\n', ' '));
                }
            }
            try (Statement s = c.createStatement();
                 ResultSet rs = s.executeQuery("SELECT collection, count(*) AS n FROM events GROUP BY 1 ORDER BY n DESC, collection LIMIT 3")) {
                while (rs.next()) System.out.println("count\t" + rs.getString(1) + "\t" + rs.getLong(2));
            }
            String did;
            try (Statement s = c.createStatement();
                 ResultSet rs = s.executeQuery("SELECT did FROM posts GROUP BY did ORDER BY count(*) DESC, did LIMIT 1")) {
                rs.next();
                did = rs.getString(1);
            }
            try (PreparedStatement ps = c.prepareStatement(
                    "SELECT did, time, langs, reply_root_uri FROM posts WHERE did = ? ORDER BY time_us, rkey LIMIT 3")) {
                ps.setString(1, did);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        Timestamp t = rs.getTimestamp("time");
                        Array langs = rs.getArray("langs");
                        String langsText = langs == null ? "NULL" : String.join(",", (String[]) langs.getArray());
                        String reply = rs.getString("reply_root_uri");
                        String replyText = rs.wasNull() ? "NULL" : reply;
                        System.out.println("post\t" + rs.getString("did") + "\t" + t.toInstant() + "\t" + langsText + "\t" + replyText);
                    }
                }
            }
        }
    }
}
